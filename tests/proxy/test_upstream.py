"""The pool of idle upstream links, over real loopback TCP connections."""

from __future__ import annotations

import asyncio
import time

from proxy.link import Link
from proxy.upstream import Pool


async def _connected_link() -> tuple[Link, asyncio.StreamWriter, asyncio.Server]:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, link = await asyncio.get_running_loop().create_connection(Link, "127.0.0.1", port)
    return link, await asyncio.wait_for(accepted.get(), 5), server


async def test_a_link_parked_while_paused_still_notices_its_peer_closing() -> None:
    """A slow client pauses the upstream link; the response ended in bytes already read, so
    the link is pooled paused. Parked, it must read again: the peer's close evicts it, instead
    of the next request being sent over a link that no longer reads."""
    link, peer, server = await _connected_link()
    pool = Pool(clock=time.monotonic, idle_timeout=60.0)
    try:
        link.pause_reading()
        pool.put("api", link)
        peer.close()
        deadline = time.monotonic() + 2
        while not link.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert link.closed
        assert pool.take("api") is None
    finally:
        link.close()
        server.close()
        await server.wait_closed()
