"""The admin server (Linkerd's port 4191): ``/metrics``, ``/ready``, ``/live``, and
``/certificate``: the workload certificate in use with its chain (PEM; public material only), so
that expiry exporters and ``trustmesh check`` can read what a proxy presents without a handshake.

Not on the data path, so it uses asyncio streams and reads one small request per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.listener import listen_error
from proxy.metrics import ProxyMetrics

_MAX_HEAD = 8192
# Seconds to hand an answer to a client: one that never reads a large /metrics must not
# hold its handler (and the answer) for ever.
WRITE_TIMEOUT = 10.0


class AdminServer:
    """Serves Prometheus metrics and the readiness/liveness probes."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        ready: Callable[[], bool],
        certificate: Callable[[], bytes | None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.certificate = certificate

    async def start(self, host: str, port: int) -> asyncio.Server:
        try:
            return await asyncio.start_server(self._handle, host, port, reuse_address=True)
        except OSError as e:
            raise listen_error("admin", host, port, e) from None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes, str]:
        """(status, reason, body, content type) for one request; pure apart from reading state."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "Method Not Allowed", b"method not allowed\n", "text/plain"
        if path == "/live":
            return 200, "OK", b"live\n", "text/plain"
        if path == "/ready":
            if self.ready():
                return 200, "OK", b"ready\n", "text/plain"
            return 503, "Service Unavailable", b"not ready\n", "text/plain"
        if path == "/metrics":
            body = self.metrics.render().encode()
            return 200, "OK", body, "text/plain; version=0.0.4"
        if path == "/certificate" and self.certificate is not None:
            pem = self.certificate()
            if pem is None:
                return 503, "Service Unavailable", b"no certificate yet\n", "text/plain"
            return 200, "OK", pem, "application/x-pem-file"
        return 404, "Not Found", b"not found\n", "text/plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEAD:
                raise ValueError("request head too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                raise ValueError("malformed request line")
            status, reason, body, ctype = self.respond(parts[0], parts[1])
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + (b"" if parts[0] == "HEAD" else body)
            )
            try:  # bounded: a client that never reads its answer must not hold this handler
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
            except TimeoutError:
                writer.transport.abort()
                return
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        except ConnectionError:
            pass
        finally:
            writer.close()
