"""The admin port: ``/ready`` (200 only with a valid issuer), ``/live`` and ``/metrics``.

A deliberately small HTTP/1.1 server on asyncio (one request per connection): the admin port is
scraped every few seconds, so simplicity beats features here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT = 5.0
# A client that does not read its answer loses the connection after this many seconds
# (else it would hold the handler and the answer for ever).
WRITE_TIMEOUT = 10.0


class AdminServer:
    def __init__(self, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> None:
        self._registry = registry
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for a request; pure, so tests can call it."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/live":
            return 200, "text/plain", b"live\n"
        if path == "/ready":
            ok, detail = self._ready()
            return (200 if ok else 503), "text/plain", (detail + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method = line[0]
                status, ctype, body = self.respond(method, line[1])
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
            status, ctype, body, method = 400, "text/plain", b"bad request\n", "GET"
        except Exception:
            log.exception("admin request failed")
            status, ctype, body, method = 500, "text/plain", b"internal error\n", "GET"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]  # fmt: skip
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header + (b"" if method == "HEAD" else body))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            return
        except ConnectionError:
            pass
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
