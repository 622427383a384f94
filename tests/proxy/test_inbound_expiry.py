"""An inbound HTTP connection takes no request after the client certificate that proved its
identity has expired: at that NotAfter it is retired. Idle, the server proxy closes it;
carrying a request, the answer says ``connection: close`` and the connection closes after it.
An opaque relay keeps running: a stream cannot move to a new connection, and ending every
long-lived one (a database session, a WebSocket) at each certificate expiry would be an outage
of its own. (The outbound side retires its connections at the server certificate's NotAfter,
tested in test_http1.py.)"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from proxy_mesh import run_mesh, sample

from pki.certs import issue_identity
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from proxy.meshtls import MeshCredentials

pytestmark = pytest.mark.timeout(60)


def expiring(pki, seconds: float) -> tuple[MeshCredentials, float]:  # type: ignore[no-untyped-def]
    """web's credentials with a certificate that expires ``seconds`` from now, and that time."""
    ident, key = Identity("web", "default"), PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    issued = datetime.now(UTC) - timedelta(hours=24) + timedelta(seconds=seconds)
    cred = issue_identity(ident, key, pki.issuer, now=issued, skew=timedelta(0))
    creds = MeshCredentials(ident.dns_name, cred.chain_pem(), key.to_pem(), pki.bundle.pem())
    return creds, cred.certificate.not_after.timestamp()


async def _sleepy_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers ``GET /<seconds>`` after that many seconds, keep-alive."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(float(head.split(b" ", 2)[1][1:] or b"0"))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _get(port: int, seconds: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /%g HTTP/1.1\r\nHost: api.local\r\n\r\n" % seconds)
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            return head + await reader.readexactly(length)
    finally:
        writer.close()


def _inbound_open(mesh) -> float:  # type: ignore[no-untyped-def]
    text = mesh.server.metrics.render()
    return sample(text, "tcp_open_connections", direction="inbound", peer="src")


async def _until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_http_connections_are_retired_at_the_client_certificates_expiry(pki) -> None:
    web, not_after = expiring(pki, 4.0)
    app = await asyncio.start_server(_sleepy_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    try:
        async with run_mesh(web, pki.credentials("api"), app_port=app_port) as mesh:
            mesh.client.outbound.pool.idle_timeout = 60  # type: ignore[union-attr]
            # Two mesh connections, both pooled by the client proxy once answered.
            await asyncio.gather(_get(mesh.outbound, 0.3), _get(mesh.outbound, 0.3))
            assert _inbound_open(mesh) == 2
            # One carries a request across the expiry; the other stays idle.
            busy = asyncio.create_task(_get(mesh.outbound, not_after - time.time() + 1.0))
            await asyncio.sleep(not_after - time.time() + 0.4)
            assert _inbound_open(mesh) == 1  # the idle one was closed at the expiry
            answer = await busy
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer
            # The answer said connection: close to the client proxy, which did not pool it.
            assert await _until(lambda: _inbound_open(mesh) == 0, 1.0)
            assert mesh.client.outbound.pool.idle_count() == 0  # type: ignore[union-attr]
            # A new connection needs a valid certificate: the server proxy refuses this one.
            refused = await _get(mesh.outbound, 0)
            assert refused.startswith(b"HTTP/1.1 502"), refused
    finally:
        app.close()


async def _hold_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
    finally:
        writer.close()


async def test_an_opaque_relay_keeps_running_past_the_client_certificates_expiry(pki) -> None:
    web, not_after = expiring(pki, 3.0)
    app = await asyncio.start_server(_hold_and_echo, "127.0.0.1", 0)
    tcp_port = app.sockets[0].getsockname()[1]
    try:
        async with run_mesh(
            web, pki.credentials("api"), app_port=tcp_port, tcp_port=tcp_port
        ) as mesh:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", mesh.client.port("upstream:tcp-echo")
            )
            try:
                writer.write(b"ping")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(4) == b"ping"
                await asyncio.sleep(not_after - time.time() + 0.5)
                writer.write(b"still there")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(11) == b"still there"
                assert _inbound_open(mesh) == 1
            finally:
                writer.close()
    finally:
        app.close()
