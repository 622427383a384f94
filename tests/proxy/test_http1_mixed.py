"""Mixed HTTP/1.1 traffic through two real proxies (web -> mesh TLS -> api) to a real aiohttp
app: 60 keep-alive clients at once, each a seeded random run of GETs, POSTs with bodies up to
200 KB, chunked uploads, HEADs, pipelined bursts and refused requests with bodies. Every answer
must arrive, in order, with the status and the body length its request calls for, and nothing
may be logged as an error. It ties together what the other tests check one at a time
(pipelining bounds, bodies dropped after a refusal, HEAD framing, re-chunking)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from proxy_mesh import run_app, run_mesh

pytestmark = pytest.mark.timeout(60)

KINDS = ("get", "post", "head", "pipelined", "refused", "chunked", "large")


def _requests(kind: str, rng: random.Random) -> list[tuple[bytes, bytes, int]]:
    """(request bytes, expected status, expected body length; -1 for none) for ``kind``."""
    get = b"GET /echo HTTP/1.1\r\nHost: api\r\n\r\n"
    if kind == "get":
        return [(get, b"200", 0)]
    if kind == "pipelined":
        return [(get, b"200", 0)] * rng.randint(2, 100)
    if kind == "head":
        return [(b"HEAD /echo HTTP/1.1\r\nHost: api\r\n\r\n", b"200", -1)]
    if kind == "chunked":
        upload = b"POST /echo?chunked=1 HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
        return [(upload + b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n", b"200", 8)]
    body = rng.randbytes(
        {"post": rng.randint(0, 5000), "refused": rng.randint(0, 3000), "large": 200_000}[kind]
    )
    host, status = (b"nowhere", b"404") if kind == "refused" else (b"api", b"200")
    head = b"POST /echo HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n" % (host, len(body))
    return [(head + body, status, len(body) if status == b"200" else 0)]


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> int:
    fields = head.lower()
    if b"transfer-encoding: chunked" in fields:
        total = 0
        while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
            await reader.readexactly(size + 2)
            total += size
        await reader.readexactly(2)  # the empty trailer section
        return total
    length = int(fields.split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return length


async def _client(port: int, rng: random.Random, seen: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(rng.randint(1, 30)):
            kind = rng.choice(KINDS)
            requests = _requests(kind, rng)
            writer.write(b"".join(request for request, _, _ in requests))
            await writer.drain()
            for _, status, length in requests:
                async with asyncio.timeout(20):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 " + status + b" "), (kind, head[:200])
                    if length >= 0:
                        assert await _read_body(reader, head) == length, kind
                seen[kind] = seen.get(kind, 0) + 1
                assert b"connection: close" not in head.lower(), (kind, head)
    finally:
        writer.close()


async def test_mixed_keep_alive_traffic_from_many_clients(pki, caplog) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    seen: dict[str, int] = {}
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        rng = random.Random(7)
        clients = (_client(mesh.outbound, random.Random(rng.random()), seen) for _ in range(60))
        await asyncio.gather(*clients)
    assert set(seen) == set(KINDS) and sum(seen.values()) > 3_000, seen
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
