"""``trustmesh identity``: token minting, manifests, and ``serve`` as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import yaml

from identity.client import IdentityClient, IdentityClientConfig
from pki import tokens
from pki.certs import utcnow
from pki.store import FileStore
from proxy.rpc import Channel
from trustmesh.cli import main

WEB = "web.default.serviceaccount.identity.trustmesh.cluster.local"


def run(args: list[str], capsys: object) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()  # type: ignore[attr-defined]
    return code, out, err


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, as an operator stops the service; SIGKILL if it has not exited in 15 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_token_and_manifests(make_store: Callable[..., FileStore], capsys: object) -> None:
    store = make_store(utcnow())
    code, out, _ = run(
        [
            "identity",
            "token",
            "--store",
            str(store.root),
            "-s",
            "web",
            "-n",
            "default",
            "--ttl",
            "1h",
        ],
        capsys,
    )
    assert code == 0
    key = tokens.token_signing_key(store, now=utcnow())
    claims = tokens.verify_token(
        out.strip().encode(), key, audience="identity.l5d.io", now=utcnow()
    )
    assert claims.subject == "system:serviceaccount:default:web"
    code, _, err = run(
        ["identity", "token", "--store", str(store.root), "-s", "Bad", "-n", "x"], capsys
    )
    assert code == 1 and "DNS-1123" in err
    code, out, _ = run(["identity", "cert-manager-manifests", "--namespace", "mesh"], capsys)
    assert [d["kind"] for d in yaml.safe_load_all(out)] == [
        "ClusterIssuer",
        "Certificate",
        "Bundle",
    ]
    code, _, err = run(["identity", "serve", "--store", "a", "--issuer-dir", "b"], capsys)
    assert code == 2 and "choose one" in err


async def test_serve_subprocess_tls_with_workers(
    make_store: Callable[..., FileStore], tmp_path: Path
) -> None:
    store = make_store(utcnow())
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "identity", "serve", "--store", str(store.root),
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--tls", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        _, _, grpc_port, _, admin_port, _ = line.split()
        bundle = store.load().require_bundle()
        key = tokens.token_signing_key(store, now=utcnow())
        now = utcnow().replace(microsecond=0)
        claims = tokens.TokenClaims(
            "system:serviceaccount:default:web", "identity.l5d.io", now, now + timedelta(hours=1)
        )
        token = tokens.sign_token(claims, key)
        assert len(psutil.Process(proc.pid).children()) >= 1  # the worker process
        server_name = "trustmesh-identity.trustmesh.serviceaccount.identity.trustmesh.cluster.local"
        # Eight clients (eight connections): the kernel spreads them over both processes.
        clients = [
            IdentityClient(IdentityClientConfig(f"127.0.0.1:{grpc_port}", WEB, server_name=server_name),
                           lambda: token, lambda: bundle, channels=Channel, clock=utcnow)
            for _ in range(8)
        ]  # fmt: skip
        await asyncio.gather(*(c.certify_once() for c in clients))
        assert all(c.current() is not None for c in clients)
        deadline = time.monotonic() + 10
        while True:  # worker counters arrive twice a second
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
            if 'identity_issuance_total{result="ok"} 8.0' in metrics:
                break
            assert time.monotonic() < deadline, metrics
            await asyncio.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=5) as r:
            assert r.status == 200
    finally:
        _stop(proc)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]


async def test_serve_an_issuer_directory_with_local_tokens_from_a_token_store(
    make_store: Callable[..., FileStore], tmp_path: Path, capsys: object
) -> None:
    # --issuer-dir worked only with the Kubernetes validator: the local one's key lives in a
    # store, and --store is the other issuer source. --token-store names it.
    store = make_store(utcnow())
    state = store.load()
    issuer = state.require_issuer()
    secret = tmp_path / "issuer"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(issuer.chain_pem())
    (secret / "tls.key").write_bytes(issuer.key.to_pem())
    (secret / "ca.crt").write_bytes(state.require_bundle().pem())
    code, _, err = run(
        ["identity", "serve", "--issuer-dir", str(secret), "--token-validator", "kubernetes",
         "--token-store", str(store.root)],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--token-store is for --token-validator local" in err
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "identity", "serve", "--issuer-dir", str(secret),
         "--token-validator", "local", "--token-store", str(store.root),
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        grpc_port = line.split()[2]
        now = utcnow().replace(microsecond=0)
        token = tokens.sign_token(
            tokens.TokenClaims(
                "system:serviceaccount:default:web",
                "identity.l5d.io",
                now,
                now + timedelta(hours=1),
            ),
            tokens.token_signing_key(store, now=now),
        )
        client = IdentityClient(
            IdentityClientConfig(f"127.0.0.1:{grpc_port}", WEB),
            lambda: token, lambda: state.require_bundle(), channels=Channel, clock=utcnow,
        )  # fmt: skip
        await client.certify_once()
        current = client.current()
        assert current is not None
    finally:
        _stop(proc)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]


def test_serve_startup_errors_are_one_line(
    make_store: Callable[..., FileStore], tmp_path: Path, capsys: object
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "anchors.pem"
    garbage.write_bytes(b"not a certificate")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    serve = ["identity", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    cases = [
        (["--issuer-dir", str(empty), "--kubeconfig", str(kubeconfig)], "holds no issuer files"),
        (["--issuer-dir", str(empty), "--kubeconfig", str(tmp_path / "none")], "Kubernetes"),
        (["--kubernetes", "--kubeconfig", str(empty / "none")], "Kubernetes"),
        (["--issuer-dir", str(empty), "--kubeconfig", str(kubeconfig),
          "--trust-anchors", str(garbage)], "trust anchors"),
    ]  # fmt: skip
    store = str(make_store(utcnow()).root)
    usage = [  # a window it could not issue is refused before anything starts
        (["--store", store, "--issuance-lifetime", "99999999d"], "issuance lifetime"),
        (["--store", store, "--clock-skew", "99999999d"], "clock skew"),
    ]
    for expected, group in ((1, cases), (2, usage)):
        for args, text in group:
            code, out, err = run(serve + args, capsys)
            assert (code, err.count("\n"), text in err) == (expected, 1, True), (args, err)
            assert err.startswith("error: ") and out == ""


def test_serve_on_a_port_in_use_exits_with_one_line(
    make_store: Callable[..., FileStore],
) -> None:
    import grpc

    store = make_store(utcnow())
    taken = grpc.server(ThreadPoolExecutor(1))  # a grpc server: its socket has SO_REUSEPORT
    port = taken.add_insecure_port("127.0.0.1:0")
    taken.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "trustmesh", "identity", "serve", "--store", str(store.root),
             "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        taken.stop(0)
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert proc.returncode == 1
    assert lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize("ttl", ["366d", "999999999d"])
def test_token_ttl_over_a_year_is_a_usage_error(
    make_store: Callable[..., FileStore], capsys: object, ttl: str
) -> None:
    store = make_store(utcnow())
    args = ["identity", "token", "--store", str(store.root), "-s", "web", "-n", "default"]
    code, out, err = run([*args, "--ttl", ttl], capsys)
    assert (code, out, err.count("\n")) == (2, "", 1) and "longer than 365d" in err, err
    code, out, _ = run([*args, "--ttl", "365d"], capsys)
    assert code == 0 and out.count(".") == 2  # a JWT
