"""The gRPC server, called by a client generated from Linkerd's identity proto."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from identity_testkit import DOMAIN, Env, csr_for, identity
from prometheus_client.parser import text_string_to_metric_families

from identity.errors import StartupError
from identity.server import IdentityServer, RefusalLog, ServerConfig, tune_gc
from identity.sources import StoreSource
from pki import tokens
from pki.bundle import TrustBundle
from pki.certs import Certificate, utcnow
from pki.keys import PrivateKey
from pki.rotation import activate_anchor, init_anchor, issue_issuer
from pki.store import FileStore
from pki.verify import verify_leaf
from protos import identity_pb2, identity_pb2_grpc


def request(
    env: Env, sa: str = "web", ns: str = "default", **kw: object
) -> identity_pb2.CertifyRequest:
    name = identity(sa, ns)
    fields: dict[str, object] = {
        "identity": name,
        "token": env.token(sa, ns),
        "certificate_signing_request": csr_for(name),
    }
    fields.update(kw)
    return identity_pb2.CertifyRequest(**fields)  # type: ignore[arg-type]


async def call(port: int, req: identity_pb2.CertifyRequest) -> identity_pb2.CertifyResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return await identity_pb2_grpc.IdentityStub(ch).Certify(req, timeout=10)


async def refused(port: int, req: identity_pb2.CertifyRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(port, req)
    return info.value


async def test_linkerd_client_certifies(env: Env, server: IdentityServer) -> None:
    resp = await call(server.port, request(env))
    leaf = Certificate.from_der(resp.leaf_certificate)
    chain = tuple(Certificate.from_der(d) for d in resp.intermediate_certificates)
    state = env.store.load()
    assert chain[0] == state.require_issuer().certificate  # issuer first, anchor not included
    assert all(c not in state.require_bundle() for c in chain)
    verify_leaf(leaf, chain, state.require_bundle(), at=utcnow(), expected_identity=identity())
    assert resp.valid_until.ToDatetime().replace(tzinfo=leaf.not_after.tzinfo) == leaf.not_after


async def test_refusals_have_specific_codes(env: Env, server: IdentityServer) -> None:
    port = server.port
    name = identity()
    cases = [
        (request(env, token=env.token("db", "prod")), "FAILED_PRECONDITION", "did not match"),
        (request(env, token=env.token(issued=utcnow() - timedelta(hours=2))), "FAILED_PRECONDITION", "expired"),
        (request(env, token=env.token(key=PrivateKey.generate())), "FAILED_PRECONDITION", "key"),
        (request(env, token=env.token(audience="kubernetes")), "FAILED_PRECONDITION", "audience"),
        (request(env, token=b"not-a-jwt"), "INVALID_ARGUMENT", "compact JWS"),
        (request(env, certificate_signing_request=b"\x30\x82garbage"), "INVALID_ARGUMENT", "PKCS#10"),
        (request(env, certificate_signing_request=b"\x30" * 20_000), "RESOURCE_EXHAUSTED", "over the limit"),
        (request(env, certificate_signing_request=csr_for(identity("api"))), "FAILED_PRECONDITION", "CSR names"),
        (request(env, identity=""), "INVALID_ARGUMENT", "missing identity"),
        (request(env, token=b""), "INVALID_ARGUMENT", "missing token"),
    ]  # fmt: skip
    for req, code, text in cases:
        err = await refused(port, req)
        assert (err.code().name, text in (err.details() or "")) == (code, True), (
            req.identity, err.details(),
        )  # fmt: skip
    # A whole message over the gRPC limit is refused by gRPC itself, unparsed.
    big = request(env, token=b"x" * 100_000)
    assert (await refused(port, big)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is still fine afterwards, and counted every outcome.
    await call(port, request(env))
    results = server.stats.results
    assert results["ok"] == 1
    assert results["unauthenticated"] == 3 and results["identity_mismatch"] == 1
    assert results["too_large"] == 1 and results["csr_refused"] == 1
    assert name


async def test_not_ready_without_issuer(env: Env, tmp_path: object) -> None:
    from pki.store import FileStore

    empty = FileStore(env.store.root.parent / "empty")
    srv = IdentityServer(ServerConfig(), StoreSource(empty), env.validator(utcnow), clock=utcnow)
    await srv.start()
    try:
        err = await refused(srv.port, request(env))
        assert err.code() is grpc.StatusCode.UNAVAILABLE and "not ready" in (err.details() or "")
        assert srv.readiness()[0] is False
        assert srv.reloads.counts()["error"] == 1
    finally:
        await srv.stop(0)


async def test_an_expired_old_anchor_left_in_the_bundle_does_not_stop_issuance(
    tmp_path: Path,
) -> None:
    # A staged rotation leaves the old anchor in the bundle until 'bundle remove'. Both anchors
    # carry the default name; the server once picked the issuer's anchor by name, took the old
    # one's NotAfter for the new issuer's, and refused every Certify once the old one expired.
    store = FileStore(tmp_path / "store")
    start = utcnow()
    # the old anchor expires ~3 s from now (NotAfter = now + lifetime + the 20 s skew)
    init_anchor(store, now=start - timedelta(seconds=20), lifetime=timedelta(seconds=3))
    issue_issuer(store, now=start)
    token_key = tokens.token_signing_key(store, now=start)
    init_anchor(store, now=start, stage=True)
    state = activate_anchor(store, now=start)
    old, new = state.require_bundle().anchors
    assert old.subject == new.subject and old.not_after < start + timedelta(seconds=4)
    env = Env(store, token_key, start)
    srv = IdentityServer(ServerConfig(), StoreSource(store), env.validator(utcnow), clock=utcnow)
    await srv.start()
    try:
        await asyncio.sleep(max(0.0, (old.not_after - utcnow()).total_seconds()) + 0.5)
        assert utcnow() > old.not_after
        assert srv.readiness()[0] is True
        response = await call(srv.port, request(env))
        leaf = Certificate.from_der(response.leaf_certificate)
        chain = [Certificate.from_der(d) for d in response.intermediate_certificates]
        verify_leaf(leaf, chain, TrustBundle((new,)), at=utcnow(), expected_identity=identity())
    finally:
        await srv.stop(0)


async def test_burst_beyond_grpc_pending_limit_is_fully_served(
    env: Env, server: IdentityServer
) -> None:
    # 3,500 calls at once: past grpc's default limits on calls waiting for a handler (1,000 /
    # 3,000), which cancel the excess unless the server raises them. Every call must succeed.
    key = PrivateKey.generate()  # one key keeps setup cheap; each call still has its own CSR check
    from pki.csr import create_csr

    count = 3500
    reqs = []
    for i in range(count):
        name = identity(f"sa-{i}", "load")
        reqs.append(
            identity_pb2.CertifyRequest(
                identity=name,
                token=env.token(f"sa-{i}", "load"),
                certificate_signing_request=create_csr(name, key),
            )
        )
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    try:
        stubs = [identity_pb2_grpc.IdentityStub(ch) for ch in channels]
        results = await asyncio.gather(
            *(stubs[i % 4].Certify(r, timeout=60) for i, r in enumerate(reqs)),
            return_exceptions=True,
        )
    finally:
        for ch in channels:
            await ch.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    names = {Certificate.from_der(r.leaf_certificate).dns_names[0] for r in results}  # type: ignore[union-attr]
    assert len(names) == count
    assert server.stats.results["ok"] == count


async def test_tls_mode_serves_its_own_identity(env: Env) -> None:
    srv = IdentityServer(
        ServerConfig(tls=True), StoreSource(env.store), env.validator(utcnow), clock=utcnow
    )
    await srv.start()
    try:
        bundle = env.store.load().require_bundle()
        server_name = srv.config.server_identity.dns_name
        assert (
            server_name
            == "trustmesh-identity.trustmesh.serviceaccount.identity.trustmesh.cluster.local"
        )
        creds = grpc.ssl_channel_credentials(root_certificates=bundle.pem())
        opts = [("grpc.ssl_target_name_override", server_name)]
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", creds, options=opts) as ch:
            resp = await identity_pb2_grpc.IdentityStub(ch).Certify(request(env), timeout=10)
        assert Certificate.from_der(resp.leaf_certificate).dns_names == (identity(),)
        serving = srv.serving.credential
        assert serving is not None and serving.certificate.dns_names == (server_name,)
        # A client expecting another name refuses the handshake.
        opts = [("grpc.ssl_target_name_override", identity("impostor"))]
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", creds, options=opts) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await identity_pb2_grpc.IdentityStub(ch).Certify(request(env), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)
    assert DOMAIN.trust_domain == "cluster.local"


async def test_admin_endpoints(env: Env, server: IdentityServer) -> None:
    await call(server.port, request(env))

    async def get(path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.admin_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    assert (await get("/live"))[0] == 200
    status, body = await get("/ready")
    assert status == 200 and "ready" in body
    status, metrics = await get("/metrics")
    assert status == 200
    state = env.store.load()
    issuer = state.require_issuer()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert samples[("identity_issuance_total", (("result", "ok"),))] == 1
    assert samples[("identity_issuer_reloads_total", (("result", "updated"),))] == 1
    # The process families, for memory and descriptor alerts (each proxy holds a connection).
    assert samples[("process_open_fds", ())] >= 1
    assert samples[("process_max_fds", ())] >= samples[("process_open_fds", ())]
    assert samples[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert samples[("identity_issuance_duration_seconds_count", ())] == 1
    assert (
        samples[("identity_issuer_not_after_timestamp_seconds", ())] == issuer.expires.timestamp()
    )
    anchor = state.require_bundle().anchors[0]
    key = (("fingerprint", anchor.fingerprint[:16]), ("subject", anchor.subject))
    assert samples[("identity_trust_anchor_not_after_timestamp_seconds", key)] == (
        anchor.not_after.timestamp()
    )
    ttl = samples[("issuer_cert_ttl_seconds", ())]  # read earlier, so at least as large
    assert 0 <= ttl - (issuer.expires.timestamp() - utcnow().timestamp()) < 60
    assert samples[("identity_issuer_ready", ())] == 1
    assert (await get("/nope"))[0] == 404


async def test_callers_trust_bundles_are_observed(env: Env, server: IdentityServer) -> None:
    """Field 1000: the CA counts identities by the bundle digest their proxy reported with its
    latest successful Certify; refused calls never count."""
    current = env.store.load().require_bundle().digest
    stale = "0" * 64
    await call(server.port, request(env, "web", trust_bundle_digest=current))
    await call(server.port, request(env, "api", trust_bundle_digest=stale))
    await call(server.port, request(env, "db"))  # a Linkerd proxy: no digest
    await call(server.port, request(env, "api", trust_bundle_digest=current))  # api renewed
    forged = request(env, "cache", token=env.token("web"), trust_bundle_digest=stale)
    assert (await refused(server.port, forged)).code() is grpc.StatusCode.FAILED_PRECONDITION

    def value(digest: str, is_current: str) -> float | None:
        return server.registry.get_sample_value(
            "identity_caller_trust_bundles", {"digest": digest, "current": is_current}
        )

    assert value(current, "true") == 2
    assert value("", "false") == 1
    assert value(stale, "false") is None


async def test_audit_log_of_issuance_and_refusals(
    env: Env, server: IdentityServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="identity.server")
    req = request(env)
    resp = await call(server.port, req)
    leaf = Certificate.from_der(resp.leaf_certificate)
    forged = request(env, token=env.token("db", "prod"))
    await refused(server.port, forged)
    issued = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"issued certificate for {identity()} serial={leaf.serial:x} until "
        f"{leaf.not_after.isoformat()}"
        in m
        and "peer=ipv4:127.0.0.1:" in m
        for m in issued
    )
    assert len(refusals) == 1
    assert "identity_mismatch: requested identity" in refusals[0]
    assert f"refused Certify for {identity()!r} from ipv4:127.0.0.1:" in refusals[0]
    for secret in (req.token, forged.token):  # bearer tokens never reach the log
        assert secret.decode() not in caplog.text
        assert secret.decode().split(".")[2] not in caplog.text


def test_refusal_log_is_rate_limited_and_counts_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(burst=2, period=1.0, monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="identity.server")
    for _ in range(5):
        refusals.refused("web", "ipv4:127.0.0.1:1", "token_invalid", "bad token")
    assert len(caplog.records) == 2 and refusals.suppressed == 3
    now[0] = 1.0  # next window
    refusals.refused("web", "ipv4:127.0.0.1:1", "token_invalid", "bad token")
    assert "(3 more refusals not logged)" in caplog.records[-1].getMessage()
    assert refusals.suppressed == 0
    with pytest.raises(ValueError, match="positive"):
        RefusalLog(burst=0)


def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (10_000, 50, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_an_address_in_use_is_refused_and_nothing_is_left_running(
    env: Env, server: IdentityServer
) -> None:
    # grpc sets SO_REUSEPORT on its listening sockets, so a second server on a taken port
    # would silently share its connections instead of failing.
    def second(**kw: str) -> IdentityServer:
        config = ServerConfig(**kw)  # type: ignore[arg-type]
        return IdentityServer(config, StoreSource(env.store), env.validator(utcnow), clock=utcnow)

    taken = f"127.0.0.1:{server.port}"
    other = second(listen=taken)
    try:
        with pytest.raises(StartupError, match=f"cannot listen on {taken}: .*in use"):
            await other.start()
    finally:
        await other.stop(0)
    # The admin port taken: refused too, and the gRPC server it had started is stopped.
    other = second(admin_listen=f"127.0.0.1:{server.admin_port}")
    with pytest.raises(StartupError, match="in use"):
        await other.start()
    assert other.port != 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(other.port, request(env))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    await call(server.port, request(env))  # the first server still serves alone


async def test_a_request_that_is_not_a_certify_request_is_invalid_argument(
    env: Env, server: IdentityServer, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc answers a deserializer exception with UNKNOWN and logs a traceback per call,
    # unrated and uncounted; a client looping on a bad encoder would flood the log.
    caplog.set_level(logging.WARNING)
    identity_field = b"\x0a\x03\xff\xfe\xfd"  # field 1 (a proto3 string) not UTF-8
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        raw = ch.unary_unary("/io.linkerd.proxy.identity.Identity/Certify")
        for body in (identity_field, b"\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(body, timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a CertifyRequest" in (info.value.details() or "")
    assert server.stats.results["invalid_request"] == 2
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "Traceback" not in caplog.text
