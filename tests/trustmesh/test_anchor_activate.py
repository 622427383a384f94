"""``pki anchor activate --proxy/--identity``: the staged anchor is activated only once the
workloads hold the bundle with it. Proxies' admin endpoints are real HTTP servers on loopback
answering as a proxy does; the identity service is the real one, fed real Certify calls."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from alerts_testkit import http_server
from identity_testkit import Env, csr_for, identity, make_env
from test_check import admin
from test_pki_cli import tm

from identity.server import IdentityServer, ServerConfig
from identity.sources import StoreSource
from pki.certs import utcnow
from pki.errors import StoreError
from pki.rotation import activate_anchor, bundle_add, init_anchor
from pki.store import FileStore
from protos import identity_pb2, identity_pb2_grpc
from trustmesh.checks import AdminStatus, CallerBundles, activation_blockers

NEW, OLD = "a" * 64, "b" * 64


def test_blockers_name_every_workload_not_on_the_bundle() -> None:
    ok = AdminStatus("127.0.0.1:1", True, bundle_digests=(NEW,))
    stale = AdminStatus("127.0.0.1:2", True, bundle_digests=(OLD,))
    gone = AdminStatus("127.0.0.1:3", False, "cannot reach http://127.0.0.1:3: refused")
    silent = AdminStatus("127.0.0.1:4", True)
    blockers, warnings = activation_blockers(NEW, [ok, stale, gone, silent], None)
    assert blockers == [
        f"proxy 127.0.0.1:2 holds trust bundle {OLD[:16]}",
        "proxy 127.0.0.1:3 cannot confirm its trust bundle (cannot reach "
        "http://127.0.0.1:3: refused)",
        "proxy 127.0.0.1:4 cannot confirm its trust bundle (it reports no trust bundle)",
    ]
    assert warnings == []
    # a proxy that is not ready (say, waiting for its certificate) but holds the bundle is fine
    assert activation_blockers(NEW, [AdminStatus("p", False, bundle_digests=(NEW,))], None) == (
        [],
        [],
    )


def test_blockers_from_the_identity_services_reports() -> None:
    callers = CallerBundles("id:9990", {NEW: 5, OLD: 2, "other": 1, "invalid": 0, "": 3})
    blockers, warnings = activation_blockers(NEW, [], callers)
    assert blockers == [
        "identity service id:9990: 3 identities last renewed holding another trust bundle "
        f"(2 on {OLD[:16]}, 1 on other); each reports again at its next renewal (70 % of its "
        "certificate's life) or restart"
    ]
    assert warnings == [
        "3 identities certified by id:9990 do not report their trust bundle (Linkerd proxies); "
        "check those another way"
    ]
    assert activation_blockers(NEW, [], CallerBundles("id:9990", {NEW: 7})) == ([], [])
    unreadable = CallerBundles("id:9990", {}, "cannot read http://id:9990/metrics: refused")
    assert activation_blockers(NEW, [], unreadable)[0] == [
        "identity service: cannot read http://id:9990/metrics: refused"
    ]


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[FileStore]:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=utcnow(), lifetime=timedelta(days=365))
    assert tm("pki", "--store", store.root, "issuer", "create").code == 0
    init_anchor(store, now=utcnow(), stage=True)
    yield store


def test_a_proxy_on_the_old_bundle_stops_activation(staged: FileStore) -> None:
    before = staged.load()
    assert before.next_anchor is not None
    digest = before.require_bundle().digest
    with admin(True, digest) as good, admin(True, OLD) as stale:
        refused = tm("pki", "--store", staged.root, "anchor", "activate",
                     "--proxy", good, "--proxy", stale)  # fmt: skip
        assert refused.code == 1
        assert f"not activating the staged anchor {before.next_anchor.fingerprint[:16]}" in (
            refused.err
        )
        assert f"proxy {stale} holds trust bundle {OLD[:16]}" in refused.err
        assert good not in refused.err
        assert staged.load().version == before.version  # nothing written
        forced = tm("pki", "--store", staged.root, "anchor", "activate",
                    "--proxy", good, "--proxy", stale, "--force", "-o", "json")  # fmt: skip
    assert forced.code == 0, forced.err
    assert f"warning (--force): proxy {stale} holds trust bundle" in forced.err
    assert forced.json()["anchor"] == before.next_anchor.fingerprint


def test_an_unreachable_proxy_stops_activation(staged: FileStore) -> None:
    with admin(True, "unused") as gone:
        pass  # the server is stopped: its port refuses connections now
    refused = tm("pki", "--store", staged.root, "anchor", "activate", "--proxy", gone,
                 "--timeout", "2")  # fmt: skip
    assert refused.code == 1
    assert f"proxy {gone} cannot confirm its trust bundle (cannot reach http://{gone}" in (
        refused.err
    )


def test_every_proxy_on_the_bundle_lets_activation_through(staged: FileStore) -> None:
    digest = staged.load().require_bundle().digest
    with admin(True, digest) as one, admin(False, digest) as two:
        done = tm("pki", "--store", staged.root, "anchor", "activate",
                  "--proxy", one, "--proxy", two)  # fmt: skip
    assert done.code == 0, done.err
    assert staged.load().next_anchor is None


def test_under_a_running_up_every_proxy_of_its_mesh_is_checked(staged: FileStore) -> None:
    from trustmesh.up.home import Home

    home = Home(staged.root)
    home.run_dir.mkdir()
    digest = staged.load().require_bundle().digest
    with admin(True, digest) as web, admin(True, OLD) as api, admin(True) as identity:
        home.publish(  # as 'up' does once ready (this test's process stands for 'up')
            {
                "control_plane": {"admin": {"identity": identity, "destination": identity}},
                "workloads": [
                    {"workload": "shop/web-0", "admin": web},
                    {"workload": "shop/api-0", "admin": api},
                ],
            }
        )
        refused = tm("pki", "--store", staged.root, "anchor", "activate")
        assert refused.code == 1
        assert f"checking the 2 proxies of the trustmesh up running on {staged.root}" in (
            refused.err
        )
        assert f"proxy shop/api-0 ({api}) holds trust bundle {OLD[:16]}" in refused.err
        assert "shop/web-0" not in refused.err.split("checking")[1].split("\n", 1)[1]
        # Addresses given are checked instead of the mesh's.
        done = tm("pki", "--store", staged.root, "anchor", "activate", "--proxy", web)
    assert done.code == 0, done.err
    assert "checking the" not in done.err


def test_an_endpoint_that_is_no_identity_service_stops_activation(staged: FileStore) -> None:
    with http_server(lambda path: (200, b"# nothing here\n")) as other:
        refused = tm("pki", "--store", staged.root, "anchor", "activate", "--identity", other)
    assert refused.code == 1
    assert "has no identity_caller_trust_bundles (is it a TrustMesh identity service?)" in (
        refused.err
    )


def test_a_bundle_changed_after_the_check_is_refused(staged: FileStore) -> None:
    checked = staged.load().require_bundle().digest
    other = make_env(staged.root.parent / "other", utcnow()).store.load()
    bundle_add(staged, other.anchor.pem, now=utcnow())  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="trust bundle changed since the workloads were checked"):
        activate_anchor(staged, now=utcnow(), bundle_digest=checked)
    assert staged.load().next_anchor is not None


async def _certify(port: int, env: Env, digest: str) -> None:
    name = identity()
    request = identity_pb2.CertifyRequest(
        identity=name,
        token=env.token(),
        certificate_signing_request=csr_for(name),
        trust_bundle_digest=digest,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await identity_pb2_grpc.IdentityStub(channel).Certify(request, timeout=10)


async def test_the_identity_services_reports_gate_activation(tmp_path: Path) -> None:
    # A real identity service: a proxy that renewed before the staging reported the old bundle,
    # so activation waits; once it renews holding the new bundle, activation goes through.
    env = make_env(tmp_path / "store", utcnow())
    store = env.store
    old_digest = store.trust_bundle().digest
    server = IdentityServer(
        ServerConfig(reload_interval=0.05), StoreSource(store), env.validator(utcnow), clock=utcnow
    )
    await server.start()
    try:
        await _certify(server.port, env, old_digest)
        init_anchor(store, now=utcnow(), stage=True)
        new_digest = store.trust_bundle().digest
        admin_addr = f"127.0.0.1:{server.admin_port}"
        args = ("pki", "--store", store.root, "anchor", "activate", "--identity", admin_addr)
        refused = await asyncio.to_thread(tm, *args)
        assert refused.code == 1
        assert (
            f"1 identities last renewed holding another trust bundle (1 on {old_digest[:16]})"
            in (refused.err)
        )
        await _certify(server.port, env, new_digest)  # the same identity, renewed on the new bundle
        done = await asyncio.to_thread(tm, *args)
        assert done.code == 0, done.err
        assert store.load().next_anchor is None
    finally:
        await server.stop(0)
