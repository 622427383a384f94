"""Transfer codings undone for HTTP/1.0 clients: the pure decoder, then through two proxies."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import psutil
import pytest
from proxy_mesh import behind_the_mesh

from proxy.errors import UpstreamError
from proxy.transfer_coding import TransferDecoder, transfer_codings, undecodable

pytestmark = pytest.mark.timeout(30)

TEXT = b"".join(b"line %d of the payload\n" % i for i in range(20000))


def _decode_all(decoder: TransferDecoder, pieces: list[bytes], limit: int = 4096) -> bytes:
    out = []
    for piece in pieces:
        decoder.feed(piece)
        while chunk := decoder.read(limit):
            assert len(chunk) <= limit
            out.append(chunk)
    decoder.end()
    while chunk := decoder.read(limit):
        out.append(chunk)
    return b"".join(out)


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_codings_are_parsed_and_checked() -> None:
    assert transfer_codings(b"gzip, chunked") == (b"gzip",)
    assert transfer_codings(b" Deflate ,X-GZIP") == (b"deflate", b"x-gzip")
    assert transfer_codings(b"chunked") == ()
    assert undecodable((b"gzip", b"deflate")) is None
    assert undecodable((b"br",)) == "transfer coding 'br'"
    assert "at most 4" in (undecodable((b"gzip",) * 5) or "")
    with pytest.raises(ValueError, match="'compress'"):
        TransferDecoder((b"compress",))


def test_stacked_and_multi_member_bodies_decode_in_pieces() -> None:
    # "deflate, gzip": deflate applied first, so gzip is undone first.
    coded = gzip.compress(zlib.compress(TEXT))
    assert _decode_all(TransferDecoder((b"deflate", b"gzip")), _split(coded, 777)) == TEXT
    two_members = gzip.compress(TEXT[:5000]) + gzip.compress(TEXT[5000:])
    assert _decode_all(TransferDecoder((b"x-gzip",)), _split(two_members, 1000)) == TEXT
    assert _decode_all(TransferDecoder((b"gzip",)), []) == b""  # an empty body


def test_a_bomb_comes_out_a_limit_at_a_time() -> None:
    decoder = TransferDecoder((b"gzip",))
    decoder.feed(gzip.compress(bytes(50 << 20)))  # ~50 KiB that expand to 50 MiB
    assert len(decoder.read(65536)) == 65536  # no more is decoded than asked for


@pytest.mark.parametrize(
    ("coding", "body", "error"),
    [
        (b"gzip", gzip.compress(TEXT)[:-9], "gzip body is truncated"),
        (b"gzip", b"not gzip at all", "gzip body is corrupt"),
        (b"deflate", zlib.compress(b"x") + b"tail", "data follows the end"),
    ],
)
def test_truncated_and_corrupt_bodies_raise(coding: bytes, body: bytes, error: str) -> None:
    with pytest.raises(UpstreamError, match=error):
        _decode_all(TransferDecoder((coding,)), [body])


BOMB = gzip.compress(bytes(64 << 20))


async def _app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers ``/<te>/<body>`` with that Transfer-Encoding (chunked in 1000-byte chunks unless
    ``eof``: then the body runs to the close)."""
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            _, te, kind = head.split(b" ")[1].split(b"/")
            body = {
                b"text": gzip.compress(TEXT),
                b"stacked": gzip.compress(zlib.compress(TEXT)),
                b"bomb": BOMB,
                b"broken": gzip.compress(TEXT)[:-9],
            }[kind]
            te = te.replace(b"+", b", ")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n" % te)
            if te.endswith(b"chunked"):
                for piece in _split(body, 1000):
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(body)
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _get_10(port: int, path: str) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %b HTTP/1.0\r\nHost: api\r\n\r\n" % path.encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            return head, await reader.read(-1)
    finally:
        writer.close()


async def test_an_http10_client_gets_transfer_codings_decoded(pki) -> None:
    """RFC 9112: no Transfer-Encoding reaches an HTTP/1.0 client; the proxy that talks to it
    undoes gzip/deflate (chunked or to EOF), refuses a coding it cannot undo with a 502 that
    names it, and resets the connection when the coded body turns out truncated."""
    async with behind_the_mesh(pki, _app) as mesh:
        for path in ("/gzip+chunked/text", "/deflate+gzip+chunked/stacked", "/gzip/text"):
            head, body = await _get_10(mesh.outbound, path)
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
            assert body == TEXT, path
        head, body = await _get_10(mesh.outbound, "/br+chunked/text")
        assert head.startswith(b"HTTP/1.1 502"), head
        assert b"l5d-proxy-error: the upstream used transfer coding 'br'" in head
        with pytest.raises(ConnectionResetError):
            await _get_10(mesh.outbound, "/gzip+chunked/broken")


async def test_decoding_follows_a_slow_http10_client(pki) -> None:
    """64 MiB that arrive as 64 KiB of gzip are decoded only as fast as the client reads:
    while it reads nothing the proxy's memory stays flat."""
    process = psutil.Process()
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    async with behind_the_mesh(pki, _app) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            before = process.memory_info().rss
            writer.write(b"GET /gzip+chunked/bomb HTTP/1.0\r\nHost: api\r\n\r\n")
            await asyncio.sleep(0.5)  # time for an unbounded decoder to fill memory
            grown = process.memory_info().rss - before
            total = 0
            async with asyncio.timeout(10):
                await reader.readuntil(b"\r\n\r\n")
                while chunk := await reader.read(1 << 20):
                    total += len(chunk)
        finally:
            writer.close()
    assert total == 64 << 20
    assert grown < 16 << 20, f"the proxies grew by {grown >> 20} MiB"
    # The response ends inside a resume_writing callback; asyncio's own transport once closed
    # the client's connection twice there (an AttributeError the loop reported).
    assert not loop_errors, [ctx.get("message") for ctx in loop_errors]
