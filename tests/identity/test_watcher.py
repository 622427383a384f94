"""Issuer hot reload from a store and from Secret-volume directories (``..data`` swaps)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from identity_testkit import Env, csr_for, identity
from loopback import unused_port

from identity.errors import IssuerSourceError
from identity.issuer import LINKERD_CRT, LINKERD_KEY, TLS_CA, TLS_CRT, TLS_KEY
from identity.metrics import ReloadStats
from identity.server import IdentityServer, ServerConfig
from identity.sources import DirectorySource, StoreSource
from identity.watcher import EVENT_SKIPPED, EVENT_UPDATED, IssuerWatcher
from pki.certs import Certificate, Credential, create_anchor, create_issuer, utcnow
from pki.keys import PrivateKey
from pki.rotation import issue_issuer
from protos import identity_pb2, identity_pb2_grpc

_swap = itertools.count()


class RecordedEvents:
    """Collects events in memory (the Kubernetes sink is tested against kmock)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool]] = []

    def record(self, reason: str, message: str, *, warning: bool) -> None:
        self.events.append((reason, message, warning))


def publish(directory: Path, files: dict[str, bytes]) -> None:
    """Write a Secret volume the way the kubelet does: new hidden dir, then swap ``..data``."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..v{next(_swap)}"
    version.mkdir()
    for name, data in files.items():
        (version / name).write_bytes(data)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def anchor_credential(env: Env) -> Credential:
    return env.store.load().anchor_credential()


def new_issuer(parent: Credential) -> Credential:
    return create_issuer(PrivateKey.generate(), parent, now=utcnow() - timedelta(seconds=1))


def tls_files(issuer: Credential, anchor: Credential) -> dict[str, bytes]:
    return {
        TLS_CRT: issuer.chain_pem(),
        TLS_KEY: issuer.key.to_pem(),
        TLS_CA: anchor.certificate.pem,
    }


def watcher_for(source: object, events: RecordedEvents) -> tuple[IssuerWatcher, list, ReloadStats]:
    installed: list = []
    stats = ReloadStats()
    w = IssuerWatcher(
        source,  # type: ignore[arg-type]
        installed.append,
        lambda: installed[-1] if installed else None,
        clock=utcnow,
        reloads=stats,
        events=events,
    )
    return w, installed, stats


def test_directory_formats_and_refusal(env: Env, tmp_path: Path) -> None:
    anchor = anchor_credential(env)
    first = new_issuer(anchor)
    d = tmp_path / "issuer"
    publish(d, tls_files(first, anchor))
    events = RecordedEvents()
    w, installed, stats = watcher_for(DirectorySource(d), events)
    assert w.reload() == "updated" and installed[-1].fingerprint == first.certificate.fingerprint
    assert w.reload() == "same"

    # An issuer from a foreign anchor is refused; the old one stays.
    foreign_anchor = Credential(create_anchor(k := PrivateKey.generate(), now=utcnow()), k)
    publish(d, tls_files(new_issuer(foreign_anchor), foreign_anchor))
    assert w.reload() == "refused"
    assert installed[-1].fingerprint == first.certificate.fingerprint
    reason, message, warning = events.events[-1]
    assert (reason, warning) == (EVENT_SKIPPED, True) and "does not verify" in message

    # A leaf (not a CA) is refused too; garbage is an error; the watch carries on.
    publish(d, {TLS_CRT: b"garbage", TLS_KEY: b"garbage", TLS_CA: anchor.certificate.pem})
    assert w.reload() == "refused"
    publish(d, {TLS_CA: anchor.certificate.pem})
    assert w.reload() == "error"

    # Linkerd's crt.pem/key.pem format, anchors given explicitly.
    second = new_issuer(anchor)
    d2 = tmp_path / "linkerd"
    publish(d2, {LINKERD_CRT: second.chain_pem(), LINKERD_KEY: second.key.to_pem()})
    w2, installed2, _ = watcher_for(DirectorySource(d2, env.store.load().require_bundle()), events)
    assert w2.reload() == "updated" and installed2[-1].fingerprint == second.certificate.fingerprint
    with pytest.raises(IssuerSourceError, match=r"ca\.crt"):
        DirectorySource(d2)

    assert stats.counts() == {"updated": 1, "unchanged": 0, "refused": 2, "error": 1}
    assert events.events[0][0] == EVENT_UPDATED


def test_plain_directory_without_data_link(env: Env, tmp_path: Path) -> None:
    anchor = anchor_credential(env)
    d = tmp_path / "plain"
    d.mkdir()
    issuer = new_issuer(anchor)
    for name, data in tls_files(issuer, anchor).items():
        (d / name).write_bytes(data)
    w, installed, _ = watcher_for(DirectorySource(d), RecordedEvents())
    assert w.reload() == "updated"
    newer = new_issuer(anchor)
    (d / TLS_CRT).write_bytes(newer.chain_pem())  # cert first: key mismatch for a moment
    assert w.reload() == "refused"
    (d / TLS_KEY).write_bytes(newer.key.to_pem())
    assert w.reload() == "updated" and installed[-1].fingerprint == newer.certificate.fingerprint


async def certify_issuer(
    port: int, env: Env, *, own_connection: bool = False, sa: str = "web"
) -> str:
    name = identity(sa)
    req = identity_pb2.CertifyRequest(
        identity=name, token=env.token(sa), certificate_signing_request=csr_for(name)
    )
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        resp = await identity_pb2_grpc.IdentityStub(ch).Certify(req, timeout=10)
    return Certificate.from_der(resp.intermediate_certificates[0]).fingerprint


async def test_hundred_rotations_each_used(env: Env, tmp_path: Path) -> None:
    anchor = anchor_credential(env)
    d = tmp_path / "secret"
    publish(d, tls_files(new_issuer(anchor), anchor))
    srv = IdentityServer(
        ServerConfig(reload_interval=0.01), DirectorySource(d), env.validator(utcnow), clock=utcnow
    )
    await srv.start()
    try:
        for _ in range(100):
            issuer = new_issuer(anchor)
            publish(d, tls_files(issuer, anchor))
            deadline = time.monotonic() + 5
            while srv.issuer is None or srv.issuer.fingerprint != issuer.certificate.fingerprint:
                assert time.monotonic() < deadline, "rotation not picked up within 5 s"
                await asyncio.sleep(0.005)
            assert await certify_issuer(srv.port, env) == issuer.certificate.fingerprint
        assert srv.reloads.counts()["updated"] == 101
    finally:
        await srv.stop(0)


async def test_store_rotation_and_unchanged(env: Env) -> None:
    events = RecordedEvents()
    w, installed, stats = watcher_for(StoreSource(env.store), events)
    assert w.reload() == "updated"
    from pki import tokens

    # A commit that does not touch the issuer (e.g. the token key) is not a new issuer.
    with env.store.lock():
        env.store.commit(
            {tokens.TOKEN_KEY_FILE: PrivateKey.generate().to_pem()}, reason="t", now=utcnow()
        )
    assert w.reload() == "unchanged"
    issue_issuer(env.store, now=utcnow())
    assert w.reload() == "updated"
    assert installed[-1].fingerprint == env.store.load().require_issuer().certificate.fingerprint
    assert stats.counts()["unchanged"] == 1


@contextlib.asynccontextmanager
async def two_processes(env: Env) -> AsyncIterator[IdentityServer]:
    """A plain-gRPC identity server with --workers 2: the main process and one worker."""
    from identity.validators import DEFAULT_AUDIENCE
    from identity.workers import ValidatorSpec

    spec = ValidatorSpec("local", DEFAULT_AUDIENCE, local_key_pem=env.token_key.to_pem())
    srv = IdentityServer(
        ServerConfig(reload_interval=0.05, admin_listen=None),
        StoreSource(env.store),
        env.validator(utcnow),
        clock=utcnow,
        workers=2,
        worker_validator=spec,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def issued_reaches(srv: IdentityServer, count: int, within: float = 5.0) -> None:
    """Wait until the service's ok issuances (workers' included: they report every 0.5 s)
    reach ``count``."""
    deadline = time.monotonic() + within
    while (srv.registry.get_sample_value("identity_issuance_total", {"result": "ok"}) or 0) < count:
        assert time.monotonic() < deadline, f"fewer than {count} issuances counted"
        await asyncio.sleep(0.05)


async def test_workers_share_the_port_and_follow_rotation(env: Env) -> None:
    # --workers 2: the main process and one worker serve the same port (SO_REUSEPORT); after
    # the issuer rotates, both issue from the new one only.
    async with two_processes(env) as srv:
        issue_issuer(env.store, now=utcnow())
        new = env.store.load().require_issuer().certificate.fingerprint
        deadline = time.monotonic() + 10
        while srv.issuer is None or srv.issuer.fingerprint != new:
            assert time.monotonic() < deadline, "rotation not picked up within 10 s"
            await asyncio.sleep(0.02)
        # Each call on its own connection (a local subchannel pool, else grpc reuses one); 24
        # connections all hashed to one of the two processes would happen once in ~8 million.
        seen = [
            await certify_issuer(srv.port, env, own_connection=True, sa=f"sa{i}") for i in range(24)
        ]
        assert set(seen) == {new}
        await issued_reaches(srv, 24)
        assert 0 < srv.stats.results["ok"] < 24  # the main process served some, the worker the rest
        # the worker's trust-bundle reports reach the main process too: 24 identities
        reported = srv.registry.get_sample_value(
            "identity_caller_trust_bundles", {"digest": "", "current": "false"}
        )
        assert reported == 24


async def test_each_worker_reports_its_process_families(env: Env) -> None:
    """With --workers 2, the worker's descriptors, memory and CPU are on /metrics beside the
    main process's, labelled worker="1": FileDescriptorsExhausting sees every process."""
    import resource
    import shutil
    import subprocess

    import psutil
    from prometheus_client import generate_latest

    async with two_processes(env) as srv:
        assert srv._pool is not None
        ((number, pid),) = srv._pool.pids()
        assert number == 1 and pid != os.getpid()
        value = srv.registry.get_sample_value
        fds = value("process_open_fds", {"worker": "1"})
        assert fds is not None and abs(fds - psutil.Process(pid).num_fds()) <= 2
        soft = psutil.Process(pid).rlimit(resource.RLIMIT_NOFILE)[0]
        assert value("process_max_fds", {"worker": "1"}) == soft
        assert (value("process_resident_memory_bytes", {"worker": "1"}) or 0) > 10 * 2**20
        assert (value("process_open_fds") or 0) > 0  # the main process's, unlabelled as before
        text = generate_latest(srv.registry).decode()
        assert text.count("# HELP process_open_fds ") == 1  # one family, both processes in it
        promtool = shutil.which("promtool")
        if promtool is not None:
            lint = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                timeout=30,
            )  # fmt: skip
            assert lint.returncode == 0, lint.stdout + lint.stderr
        psutil.Process(pid).kill()
        deadline = time.monotonic() + 10
        while srv._pool.pids() and srv._pool.pids()[0][1] == pid:
            assert time.monotonic() < deadline, "the killed worker still counts as alive"
            await asyncio.sleep(0.05)
        # Scraping while the worker is gone or being started again never fails.
        assert "process_open_fds" in generate_latest(srv.registry).decode()


async def test_a_worker_that_dies_is_started_again_and_its_counts_are_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A killed worker used to stay dead (a zombie, nothing logged, /ready still 200): the
    # service lost a process's capacity without a word.
    import psutil

    from identity import workers

    monkeypatch.setattr(workers, "RESTART_BACKOFF", 0.1)
    async with two_processes(env) as srv:
        pool = srv._pool
        assert pool is not None
        for i in range(24):
            await certify_issuer(srv.port, env, own_connection=True, sa=f"sa{i}")
        await issued_reaches(srv, 24)
        worker = pool._procs[0]
        with caplog.at_level("ERROR", logger="identity.workers"):
            psutil.Process(worker.pid).kill()
            deadline = time.monotonic() + 30
            while pool.restarts < 1 or not pool._procs[0].is_alive():
                assert time.monotonic() < deadline, "the dead worker was not started again"
                await asyncio.sleep(0.05)
        assert pool._procs[0].pid != worker.pid
        assert any("exited with code -9" in r.getMessage() for r in caplog.records)
        await issued_reaches(srv, 24, within=0)  # the dead worker's counts are kept
        for i in range(24):  # served again by both processes
            await certify_issuer(srv.port, env, own_connection=True, sa=f"sa{100 + i}")
        await issued_reaches(srv, 48, within=10)


def test_refused_issuer_is_retried_without_a_new_revision(env: Env, tmp_path: Path) -> None:
    # cert-manager writes an issuer valid from "now" by its own clock; an identity service whose
    # clock lags refuses it as not yet valid. Nothing changes in the Secret afterwards, so the
    # watcher must try the same revision again once it can succeed, not keep the old issuer
    # until the next rotation.
    anchor = anchor_credential(env)
    d = tmp_path / "issuer"
    publish(d, tls_files(first := new_issuer(anchor), anchor))
    t = [utcnow()]
    installed: list = []
    stats, events = ReloadStats(), RecordedEvents()
    w = IssuerWatcher(
        DirectorySource(d),
        installed.append,
        lambda: installed[-1] if installed else None,
        clock=lambda: t[0],
        reloads=stats,
        events=events,
        retry_after=timedelta(seconds=30),
    )
    assert w.reload() == "updated"
    later = create_issuer(PrivateKey.generate(), anchor, now=t[0] + timedelta(minutes=1))
    publish(d, tls_files(later, anchor))
    assert w.reload() == "refused" and "not valid before" in events.events[-1][1]
    t[0] += timedelta(seconds=29)
    assert w.reload() == "same"  # not before the retry interval
    t[0] += timedelta(seconds=2)
    assert w.reload() == "refused"  # retried: still too early
    t[0] += timedelta(seconds=31)
    assert w.reload() == "updated"
    assert installed[-1].fingerprint == later.certificate.fingerprint
    assert installed[0].fingerprint == first.certificate.fingerprint
    assert w.reload() == "same"  # after a success, only a new revision is read
    t[0] += timedelta(minutes=5)
    assert w.reload() == "same"
    assert stats.counts() == {"updated": 2, "unchanged": 0, "refused": 2, "error": 0}


async def test_a_worker_binds_the_shared_port_only_once_it_has_an_issuer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker shares the port (SO_REUSEPORT): once bound, the kernel sends it its share of
    new connections. One started again after a crash bound before the main process had sent it
    the issuer, and answered that share "cert issuer not ready yet". The worker's body, run
    here in process: nothing listens until the issuer message, then the port serves."""
    import multiprocessing

    import identity.server as server_module
    from identity.issuer import Issuer
    from identity.validators import DEFAULT_AUDIENCE
    from identity.workers import ValidatorSpec, WorkerSpec, _issuer_message, _worker

    monkeypatch.setattr(server_module, "tune_gc", lambda: None)  # not this test process's GC
    port = unused_port()
    spec = WorkerSpec(
        ServerConfig(listen=f"127.0.0.1:{port}", admin_listen=None),
        ValidatorSpec("local", DEFAULT_AUDIENCE, local_key_pem=env.token_key.to_pem()),
    )
    parent, child = multiprocessing.Pipe()
    task = asyncio.create_task(_worker(spec, child))
    try:
        await asyncio.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        state = env.store.load()
        parent.send(_issuer_message(Issuer(state.require_issuer(), state.require_bundle(), "test")))
        assert await asyncio.to_thread(parent.poll, 10) and parent.recv() == ("ready",)
        await certify_issuer(port, env, own_connection=True, sa="after-the-issuer")
    finally:
        parent.send(("stop",))
        await asyncio.wait_for(task, 10)
