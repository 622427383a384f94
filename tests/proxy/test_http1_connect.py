"""CONNECT through two real proxies (web -> mesh TLS -> api) to an app on raw sockets.

A 2xx answer turns both hops into an opaque tunnel (RFC 9110 9.3.6; Linkerd's proxy treats
CONNECT as an upgrade too); any other answer is an ordinary response after which the client
connection closes; a target that is not ``host:port`` is refused before anything is forwarded.
Before this, a tunnelled CONNECT hung: the proxy took the bytes after the 200 for a
close-delimited body and never relayed what the client sent.
"""

from __future__ import annotations

import asyncio

import pytest
from proxy_mesh import behind_the_mesh, raw_exchange, sample

from proxy.inbound import Inbound

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0


class _ConnectApp:
    """A CONNECT-serving app on raw sockets, answering by the target's port:

    - 8443: an interim 100, then 200 with a Content-Length a CONNECT answer must not
      have (the proxy ignores it), and the first tunnel bytes, all in one write; then every
      read comes back upper-cased, and at EOF it says ``BYE`` and closes;
    - 8407: 407 with a body, keep-alive;
    - anything else: 200 ``ok`` (a plain request).
    """

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.tunnelled: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                if head.startswith(b"CONNECT api:8443 "):
                    writer.write(
                        b"HTTP/1.1 100 Continue\r\n\r\n"
                        b"HTTP/1.1 200 Connection Established\r\nContent-Length: 5\r\n"
                        b"X-Tunnel: yes\r\n\r\nhello"
                    )
                    while data := await reader.read(65536):
                        self.tunnelled.append(data)
                        writer.write(data.upper())
                    writer.write(b"BYE")
                    await writer.drain()
                    return
                if head.startswith(b"CONNECT api:8407 "):
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b"Content-Length: 4\r\n\r\nnope"
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _inbound(mesh) -> Inbound:
    inbound = mesh.server.inbound
    assert inbound is not None
    return inbound


async def _read_until(reader: asyncio.StreamReader, wanted: bytes, got: bytes = b"") -> bytes:
    async with asyncio.timeout(DEADLINE):
        while wanted not in got:
            data = await reader.read(65536)
            assert data, f"EOF before {wanted!r}; got {got!r}"
            got += data
    return got


async def test_a_2xx_answer_to_connect_tunnels_both_hops_with_half_close(pki) -> None:
    app = _ConnectApp()
    async with behind_the_mesh(pki, app) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            # Host disagrees with the target: the target is the authority (RFC 9112 3.2.3).
            # "early" is sent before any answer, as clients that tunnel optimistically do.
            writer.write(b"CONNECT api:8443 HTTP/1.1\r\nHost: other\r\n\r\nearly")
            got = await _read_until(reader, b"helloEARLY")
            interim, _, rest = got.partition(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue", got
            head, _, tunnel = rest.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 Connection Established\r\n"), got
            fields = head.lower().split(b"\r\n")[1:]
            assert b"x-tunnel: yes" in fields
            assert not any(
                f.startswith((b"content-length", b"transfer-encoding", b"connection"))
                for f in fields
            ), head
            assert tunnel == b"helloEARLY"
            for word in (b"more", b"x" * 100_000):
                writer.write(word)
                await _read_until(reader, word.upper())
            assert _inbound(mesh).relays_watched == 1  # re-authorized like any relay
            writer.write_eof()  # half-close: the app still answers, then closes
            async with asyncio.timeout(DEADLINE):
                assert await reader.read(-1) == b"BYE"
        finally:
            writer.close()
    (connect,) = app.heads
    hosts = [ln for ln in connect.split(b"\r\n") if ln.lower().startswith(b"host:")]
    assert connect.startswith(b"CONNECT api:8443 HTTP/1.1\r\n"), connect
    assert hosts == [b"Host: api:8443"], connect
    assert b"l5d-client-id: web.default.serviceaccount." in connect
    assert b"".join(app.tunnelled) == b"early" + b"more" + b"x" * 100_000
    text = mesh.client.metrics.render()
    assert sample(text, "response_total", direction="outbound", status_code="200") == 1


async def test_any_other_answer_to_connect_is_an_ordinary_response(pki) -> None:
    """A refused CONNECT is relayed as an answer, and the client connection then closes:
    nothing the client sent after the CONNECT head reaches the app."""
    app = _ConnectApp()
    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(
            mesh.outbound,
            b"CONNECT api:8407 HTTP/1.1\r\nHost: api:8407\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), reply
        assert reply.endswith(b"\r\n\r\nnope"), reply
        # the proxies go on serving
        reply = await raw_exchange(
            mesh.outbound, b"GET /ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok"), reply
    assert [h.split(b"\r\n")[0] for h in app.heads] == [
        b"CONNECT api:8407 HTTP/1.1",
        b"GET /ok HTTP/1.1",
    ]
    assert app.tunnelled == []


@pytest.mark.parametrize(
    "target",
    [b"/path", b"api", b"api:", b":443", b"api:0", b"api:65536", b"api:99999999",
     b"user@api:443", b"api:443/x", b"[::1:443", b"http://api:443", b"api:4a3"],
)  # fmt: skip
async def test_a_connect_target_that_is_not_host_port_is_refused(pki, target: bytes) -> None:
    app = _ConnectApp()
    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(
            mesh.outbound, b"CONNECT %b HTTP/1.1\r\nHost: api\r\n\r\nearly" % target
        )
    head = reply.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (target, reply)
    assert b"a CONNECT request target must be host:port" in head, head
    assert app.heads == []
