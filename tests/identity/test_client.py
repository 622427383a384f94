"""The proxy-side client: schedule at explicit times, and real Certify round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from identity_testkit import Env, identity, make_env
from loopback import unused_port

from identity.client import Backoff, IdentityClientConfig, next_refresh
from identity.server import IdentityServer, ServerConfig
from identity.sources import StoreSource
from pki.bundle import TrustBundle
from pki.certs import create_anchor, issue_leaf, utcnow
from pki.csr import validate_csr
from pki.keys import KeyAlgorithm, PrivateKey
from protos import identity_pb2, identity_pb2_grpc

T0 = datetime(2030, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)


def test_refresh_after_success_is_70_percent_clamped() -> None:
    b = Backoff()
    assert next_refresh(T0 + 24 * H, T0, failures=0, backoff=b, sample=0.5) == 24 * H * 0.7
    assert next_refresh(T0 + 5 * timedelta(seconds=1), T0, failures=0, backoff=b, sample=0) == (
        timedelta(seconds=10)
    )
    assert next_refresh(T0 + 48 * H, T0, failures=0, backoff=b, sample=0) == 24 * H
    assert next_refresh(None, T0, failures=0, backoff=b, sample=0) == timedelta(seconds=10)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    b = Backoff(base=timedelta(milliseconds=100), cap=timedelta(seconds=10), jitter=0.1)
    assert b.delay(1, 0.0) == timedelta(milliseconds=100)
    assert b.delay(2, 0.0) == timedelta(milliseconds=200)
    assert b.delay(3, 0.5) == timedelta(milliseconds=400) * 0.95
    assert b.delay(30, 0.0) == timedelta(seconds=10)
    assert b.delay(30, 0.999) > timedelta(seconds=9)
    with pytest.raises(ValueError):
        b.delay(0, 0.0)


def test_failure_retry_never_passes_the_refresh_point() -> None:
    b = Backoff(base=timedelta(seconds=5), cap=timedelta(minutes=10))
    # 20 s left: 70 % is 14 s, the 6th backoff is 160 s, the earlier wins.
    assert next_refresh(T0 + timedelta(seconds=20), T0, failures=6, backoff=b, sample=0) == (
        timedelta(seconds=14)
    )
    # No certificate (or an expired one): plain backoff.
    assert next_refresh(None, T0, failures=2, backoff=b, sample=0) == timedelta(seconds=10)
    assert next_refresh(T0 - H, T0, failures=1, backoff=b, sample=0) == timedelta(seconds=5)


async def test_certifies_and_schedules(env: Env, server: IdentityServer) -> None:
    updates: list = []
    client = env.client(f"127.0.0.1:{server.port}", on_update=updates.append)
    assert client.current() is None and not client.ready
    delay = await client.step()
    cred = client.current()
    assert cred is not None and updates == [cred]
    assert cred.certificate.dns_names == (identity(),)
    remaining = cred.expires - utcnow()
    assert abs(delay - remaining * 0.7) < timedelta(seconds=2)
    first_key = cred.key.public_key_der()
    await client.step()
    assert client.current().key.public_key_der() != first_key  # type: ignore[union-attr]
    assert client.refreshes == {"ok": 2, "error": 0}
    # What the proxy renders from this state: tests/proxy/test_control_metrics.py.


async def test_refuses_a_certificate_it_cannot_verify(env: Env, server: IdentityServer) -> None:
    other = TrustBundle((create_anchor(PrivateKey.generate(), now=utcnow()),))
    client = env.client(f"127.0.0.1:{server.port}", bundle=other, rand=lambda: 0.0)
    delay = await client.step()
    assert client.current() is None and client.failures == 1
    assert "not acceptable" in (client.last_error or "")
    assert delay == timedelta(milliseconds=100)


async def test_run_backs_off_then_recovers(env: Env) -> None:
    """The loop with an injected sleep: failures while the server is down, then success."""
    port = unused_port()
    sleeps: list[float] = []
    srv_box: list[IdentityServer] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:  # bring the server up after three failures
            srv = IdentityServer(
                ServerConfig(listen=f"127.0.0.1:{port}", admin_listen=None),
                StoreSource(env.store),
                env.validator(utcnow),
                clock=utcnow,
            )
            await srv.start()
            srv_box.append(srv)
        if len(sleeps) == 4:
            raise asyncio.CancelledError

    client = env.client(
        IdentityClientConfig(f"127.0.0.1:{port}", identity(), timeout=2),
        sleep=sleep,
        rand=lambda: 0.0,
    )
    try:
        with pytest.raises(asyncio.CancelledError):
            await client.run()
    finally:
        for srv in srv_box:
            await srv.stop(0)
    assert sleeps[:3] == [0.1, 0.2, 0.4]
    assert client.ready and client.failures == 0
    assert sleeps[3] > 16 * 3600  # 70 % of a 24 h certificate
    assert client.refreshes == {"ok": 1, "error": 3}


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
async def test_tls_client_against_tls_server(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    """The proxy's TLS (cryptography's OpenSSL) verifies the chain grpc's server (BoringSSL)
    presents, whichever key the issuer and anchor use: an ML-DSA-65 chain works end to end too."""
    env = make_env(tmp_path / "store", utcnow(), algorithm)
    srv = IdentityServer(
        ServerConfig(tls=True), StoreSource(env.store), env.validator(utcnow), clock=utcnow
    )
    await srv.start()
    try:
        client = env.client(
            IdentityClientConfig(
                f"127.0.0.1:{srv.port}", identity(), server_name=srv.config.server_identity.dns_name
            )
        )
        task = asyncio.create_task(client.run())
        try:
            cred = await client.wait_ready(timeout=10)
        finally:
            task.cancel()
        assert cred.certificate.dns_names == (identity(),)
        assert cred.chain[0].key_algorithm is algorithm  # the issuer that signed the leaf
    finally:
        await srv.stop(0)


class TamperingIdentity(identity_pb2_grpc.IdentityServicer):
    """A real gRPC server that signs with the real issuer, then spoils the answer as told
    (a broken or hostile identity service)."""

    def __init__(self, env: Env) -> None:
        state = env.store.load()
        self.issuer = state.require_issuer()
        self.spoil: Callable[[identity_pb2.CertifyResponse, Any], None] = lambda r, csr: None

    async def Certify(
        self, request: identity_pb2.CertifyRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CertifyResponse:
        csr = validate_csr(request.certificate_signing_request)
        leaf = issue_leaf(csr.public_key, request.identity, self.issuer, now=utcnow())
        until = Timestamp()
        until.FromDatetime(leaf.not_after)
        response = identity_pb2.CertifyResponse(
            leaf_certificate=leaf.der,
            intermediate_certificates=[c.der for c in self.issuer.full_chain],
            valid_until=until,
        )
        self.spoil(response, csr)
        return response


async def test_refuses_answers_it_must_not_use(env: Env) -> None:
    servicer = TamperingIdentity(env)
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        client = env.client(f"127.0.0.1:{port}", rand=lambda: 0.0)
        await client.step()
        good = client.current()
        assert good is not None and client.refreshes == {"ok": 1, "error": 0}

        def other_identity(r: identity_pb2.CertifyResponse, csr: Any) -> None:
            leaf = issue_leaf(csr.public_key, identity("db"), servicer.issuer, now=utcnow())
            r.leaf_certificate = leaf.der

        def other_key(r: identity_pb2.CertifyResponse, csr: Any) -> None:
            key = PrivateKey.generate().public_key()
            r.leaf_certificate = issue_leaf(key, identity(), servicer.issuer, now=utcnow()).der

        def past_valid_until(r: identity_pb2.CertifyResponse, csr: Any) -> None:
            r.valid_until.FromDatetime(utcnow() - H)

        def empty(r: identity_pb2.CertifyResponse, csr: Any) -> None:
            r.Clear()

        cases = [
            (other_identity, "was expected"),
            (other_key, "does not match"),
            (past_valid_until, "valid_until"),
            (empty, "not a DER certificate"),
        ]
        for n, (spoil, text) in enumerate(cases, start=1):
            servicer.spoil = spoil
            await client.step()
            assert text in (client.last_error or ""), (spoil.__name__, client.last_error)
            assert client.current() is good, spoil.__name__  # the old certificate stays
            assert client.refreshes == {"ok": 1, "error": n}
    finally:
        await server.stop(0)


async def test_an_answer_that_is_not_a_certify_response_is_refused(env: Env) -> None:
    async def garbage(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"\x0a\xff\xff"  # field 1, a length running past the message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "io.linkerd.proxy.identity.Identity",
                {"Certify": grpc.unary_unary_rpc_method_handler(garbage)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        client = env.client(f"127.0.0.1:{port}")
        await client.step()
        assert client.last_error == "the Certify response does not parse"
        assert client.current() is None and client.refreshes == {"ok": 0, "error": 1}
    finally:
        await server.stop(0)
