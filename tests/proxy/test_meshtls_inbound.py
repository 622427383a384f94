"""The inbound port as a hostile client sees it: a real server proxy on 127.0.0.1, reached by a
plain pyOpenSSL client over a socket (no client proxy), with or without a certificate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import pytest
from OpenSSL import SSL
from proxy_mesh import run_app, run_mesh, sample
from test_meshtls_protocol import RawClient

import proxy.inbound as inbound_module
from proxy.lograte import PeerLog
from proxy.policy import DefaultPolicy, InboundPolicy
from proxy.settings import KexPolicy
from proxy.transport_header import ALPN, SessionProtocol, TransportHeader

pytestmark = pytest.mark.timeout(30)

FORGED = b"l5d-client-id: admin.default.serviceaccount.identity.trustmesh.cluster.local\r\n"


async def tls_exchange(
    port: int, client: RawClient, sni: str | None, request: bytes, *, alpn: bool = True
) -> bytes:
    """Handshake over a real socket, send ``request``, return the decrypted reply (to EOF).
    Raises SSL.Error when the handshake fails, ConnectionError when the proxy drops us."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = SSL.Connection(client.ctx, None)
    if sni is not None:
        conn.set_tlsext_host_name(sni.encode())
    if alpn:
        conn.set_alpn_protos([ALPN])
    conn.set_connect_state()
    reply = b""
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    pass
                with contextlib.suppress(SSL.WantReadError):
                    writer.write(conn.bio_read(65536))
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the proxy closed the connection during the handshake")
                conn.bio_write(data)
            with contextlib.suppress(SSL.WantReadError):
                writer.write(conn.bio_read(65536))  # our Finished
            conn.sendall(request)
            writer.write(conn.bio_read(65536))
            while data := await reader.read(65536):
                conn.bio_write(data)
                with contextlib.suppress(SSL.WantReadError, SSL.ZeroReturnError):
                    while chunk := conn.recv(65536):
                        reply += chunk
    finally:
        writer.close()
    return reply


def http_request(port: int, extra: bytes = b"") -> bytes:
    head = TransportHeader(port, None, SessionProtocol.HTTP1).encode()
    return head + b"GET /echo HTTP/1.1\r\nHost: api\r\n" + extra + b"Connection: close\r\n\r\n"


async def test_a_client_without_certificate_is_unauthenticated_and_cannot_claim_an_id(
    pki,
) -> None:
    """No certificate on the mesh port: the connection is TLS without a client identity
    (Linkerd's optional client auth). Policy treats it as unauthenticated, and an
    ``l5d-client-id`` the client sends, in any case spelling, never reaches the application."""
    web, api = pki.credentials("web"), pki.credentials("api")
    anonymous = RawClient(pki.bundle.pem())
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        inbound = mesh.server.port("inbound")
        for forged in (FORGED, FORGED.upper(), b"L5d-Client-Id: x\r\n" + FORGED):
            reply = await tls_exchange(
                inbound, anonymous, api.identity, http_request(app_port, forged)
            )
            assert reply.startswith(b"HTTP/1.1 200"), reply
            assert b"x-client-id: -\r\n" in reply.lower()  # the app saw no l5d-client-id
        # A client with a certificate gets its own identity, once, whatever it sent.
        known = RawClient(pki.bundle.pem(), creds=web)
        reply = await tls_exchange(inbound, known, api.identity, http_request(app_port, FORGED))
        assert f"x-client-id: {web.identity}\r\n".encode() in reply.lower()
        assert b"admin" not in reply
        # Where only authenticated clients are allowed, the anonymous one is refused.
        mesh.server_policy.update(InboundPolicy(DefaultPolicy.ALL_AUTHENTICATED))
        reply = await tls_exchange(inbound, anonymous, api.identity, http_request(app_port))
        assert reply.startswith(b"HTTP/1.1 403")
        reply = await tls_exchange(inbound, known, api.identity, http_request(app_port))
        assert reply.startswith(b"HTTP/1.1 200")


async def test_a_foreign_sni_is_refused_and_counted(pki) -> None:
    """Linkerd passes TLS for another server name through to the application; with no
    original destination to pass it to, this proxy refuses it (never terminates it with its
    own certificate, never hands it to the app as plaintext)."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        inbound = mesh.server.port("inbound")
        with pytest.raises((ConnectionError, SSL.Error)):
            await tls_exchange(
                inbound, RawClient(pki.bundle.pem(), creds=web), web.identity, http_request(9)
            )
        text = mesh.server.metrics.render()
        assert 'tls_handshakes_total{direction="inbound",group="none",result="refused"} 1' in text
        # The proxy's own name in other letter case is its own name (server names ignore case).
        reply = await tls_exchange(
            inbound,
            RawClient(pki.bundle.pem(), creds=web),
            api.identity.upper(),
            http_request(app_port),
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply


async def test_a_flood_of_refused_handshakes_logs_a_bounded_number_of_lines(
    pki, caplog: pytest.LogCaptureFixture
) -> None:
    """One log line per refused connection let any client fill the proxy's log (a file under
    'trustmesh up'); they are rate limited now, and every refusal is still counted."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        inbound = mesh.server.port("inbound")
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="proxy.inbound"):
            for _ in range(60):
                with contextlib.suppress(ConnectionError, SSL.Error):
                    await tls_exchange(
                        inbound, RawClient(pki.bundle.pem(), creds=web), web.identity,
                        http_request(9),
                    )  # fmt: skip
        windows = math.ceil(time.monotonic() - started) + 1
        text = mesh.server.metrics.render()
    assert 'tls_handshakes_total{direction="inbound",group="none",result="refused"} 60' in text
    lines = [r for r in caplog.records if r.getMessage().startswith("refusing inbound TLS")]
    assert 1 <= len(lines) <= min(59, 20 * windows), (len(lines), windows)  # 20 a second


async def test_handshakes_are_counted_by_group_under_each_policy(
    pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Classical-only clients: refused and counted under hybrid-required, served and counted
    as x25519 under hybrid-preferred; a client listing both always gets the hybrid group."""
    # A rate limiter of its own: other tests' refusals may have used up this second's lines.
    monkeypatch.setattr(inbound_module, "peer_log", PeerLog(logging.getLogger("proxy.inbound")))
    web, api = pki.credentials("web"), pki.credentials("api")
    classical = RawClient(pki.bundle.pem(), groups=b"X25519", creds=web)
    both = RawClient(pki.bundle.pem(), groups=b"X25519:X25519MLKEM768", creds=web)
    async with run_app() as app_port:
        async with run_mesh(web, api, app_port=app_port) as mesh:
            inbound = mesh.server.port("inbound")
            # TLS 1.3: the client is done before the server checks the group and hangs up.
            with caplog.at_level(logging.INFO, logger="proxy.inbound"):
                reply = await tls_exchange(inbound, classical, api.identity, http_request(app_port))
                await asyncio.sleep(0.05)  # the server's side of the refusal
            assert reply == b""
            reply = await tls_exchange(inbound, both, api.identity, http_request(app_port))
            assert reply.startswith(b"HTTP/1.1 200")
            text = mesh.server.metrics.render()
            assert 'direction="inbound",group="x25519",result="kex_refused"} 1' in text
            assert 'direction="inbound",group="X25519MLKEM768",result="ok"} 1' in text
            # The log names the client and why (the runbook KeyExchangeRefused relies on it).
            (refused,) = [
                r.getMessage()
                for r in caplog.records
                if r.getMessage().startswith("inbound TLS handshake from 127.0.0.1 failed")
            ]
            assert "negotiated x25519, and X25519MLKEM768 is required" in refused
        async with run_mesh(web, api, app_port=app_port, kex=KexPolicy.HYBRID_PREFERRED) as mesh:
            inbound = mesh.server.port("inbound")
            reply = await tls_exchange(inbound, classical, api.identity, http_request(app_port))
            assert reply.startswith(b"HTTP/1.1 200")
            text = mesh.server.metrics.render()
            assert 'direction="inbound",group="x25519",result="ok"} 1' in text


async def _read_or_reset(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionResetError:
        return b""


async def _stall(port: int, client: RawClient, sni: str, *, finish: bool) -> float:
    """Send a ClientHello (and with ``finish`` complete the handshake), then nothing more;
    return how long the proxy took to close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = SSL.Connection(client.ctx, None)
    conn.set_tlsext_host_name(sni.encode())
    conn.set_alpn_protos([ALPN])
    conn.set_connect_state()
    started = time.monotonic()
    try:
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        writer.write(conn.bio_read(65536))
        async with asyncio.timeout(10):
            while data := await _read_or_reset(reader):
                if finish:
                    conn.bio_write(data)
                    with contextlib.suppress(SSL.WantReadError):
                        conn.do_handshake()
                    with contextlib.suppress(SSL.WantReadError):
                        writer.write(conn.bio_read(65536))
        return time.monotonic() - started
    finally:
        writer.close()


async def test_a_client_that_stalls_before_its_transport_header_is_closed(pki) -> None:
    """A ClientHello and then silence held the connection and its TLS state for ever (the
    detect timeout ends before the handshake starts); so did a finished handshake without the
    transport header. Both are closed after the setup timeout, and counted; others go on."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        inbound = mesh.server.inbound
        assert inbound is not None
        inbound.setup_timeout = 0.5
        port = mesh.server.port("inbound")
        client = RawClient(pki.bundle.pem(), creds=web)
        for finish in (False, True):
            took = await _stall(port, client, api.identity, finish=finish)
            assert 0.4 < took < 5, (finish, took)
        text = mesh.server.metrics.render()
        assert sample(text, "tls_handshakes_total", direction="inbound", result="timeout") == 1
        assert sample(text, "tls_handshakes_total", direction="inbound", result="ok") == 1
        reply = await tls_exchange(port, client, api.identity, http_request(app_port))
        assert reply.startswith(b"HTTP/1.1 200"), reply
