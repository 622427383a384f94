"""The admin port: ``/live``, ``/ready`` and ``/metrics`` (Prometheus text) over plain HTTP/1.1.

Deliberately tiny (one request per connection, GET/HEAD only, bounded reads) so that the control
plane's health endpoints need no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_MAX_HEADER = 8192
# A client that does not read its answer loses the connection after this many seconds
# (else it would hold the handler and the answer for ever).
WRITE_TIMEOUT = 10.0


class AdminServer:
    def __init__(self, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> None:
        self._registry = registry
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request; pure, so tests need no socket."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/live":
            return 200, "text/plain", b"live\n"
        if path == "/ready":
            ok, why = self._ready()
            return (
                (200, "text/plain", b"ready\n")
                if ok
                else (503, "text/plain", f"not ready: {why}\n".encode())
            )
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(head) > _MAX_HEADER:
                raise ValueError("header too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                raise ValueError("bad request line")
            status, ctype, body = self.respond(parts[0], parts[1])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, ctype, body, parts = 400, "text/plain", b"bad request\n", ["GET"]
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }[status]
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header + (b"" if parts[0] == "HEAD" else body))
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
