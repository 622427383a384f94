"""Opening and reusing connections to endpoints: plain, or mesh TLS with a transport header.

:class:`Connector` dials an :class:`~proxy.routes.Endpoint`. A meshed endpoint gets a TLS 1.3
session whose SNI and expected identity are the endpoint's identity, ALPN
``transport.l5d.io/v1``, and the transport header naming the application port and session
protocol. The header is written only to a peer that selected that ALPN protocol: the session
refuses any other (counted as ``tls_handshakes_total{result="alpn_refused"}``, answered 502).
:class:`Pool` keeps idle HTTP/1 connections per (endpoint, protocol) and drops them after an
idle timeout (Linkerd: 3 s) or as soon as the peer closes one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from proxy.errors import TLSError, UpstreamError, handshake_result
from proxy.link import NULL_SINK, Link
from proxy.meshtls import HandshakeInfo, MeshTls
from proxy.metrics import ProxyMetrics
from proxy.routes import Endpoint
from proxy.transport_header import SessionProtocol, TransportHeader

CONNECT_TIMEOUT = 1.0  # Linkerd's outbound connect timeout
POOL_IDLE_TIMEOUT = 3.0


class Connector:
    """Dials endpoints for one direction of the proxy and counts what it opens."""

    def __init__(
        self,
        tls: MeshTls | None,
        metrics: ProxyMetrics,
        *,
        direction: str,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.tls = tls
        self.metrics = metrics
        self.direction = direction
        self.connect_timeout = connect_timeout

    async def connect(
        self, endpoint: Endpoint, protocol: SessionProtocol | None, *, header: bool = True
    ) -> Link:
        """An open link to ``endpoint``; for a meshed one, handshaken and (``header``) its
        transport header sent. Without the header the link can only show that the endpoint
        answers: its peer closes it quietly when it closes."""
        loop = asyncio.get_running_loop()
        meshed = endpoint.identity is not None and self.tls is not None
        port = endpoint.proxy_port if meshed and endpoint.proxy_port else endpoint.port
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, link = await loop.create_connection(Link, endpoint.host, port)
                if meshed:
                    assert self.tls is not None and endpoint.identity is not None
                    info = await self._handshake(link, endpoint.identity)
                    if header:
                        link.write(TransportHeader(endpoint.port, None, protocol).encode())
                    # Requests are not sent over a connection whose peer certificate has
                    # expired, however busy it keeps: a new one verifies the peer again.
                    link.retire_at(loop.time() + info.peer_not_after - time.time())
        except TimeoutError:
            raise UpstreamError(
                f"connecting to {endpoint.host}:{port} timed out after {self.connect_timeout}s"
            ) from None
        except OSError as e:
            raise UpstreamError(
                f"connecting to {endpoint.host}:{port} failed: {e.strerror}"
            ) from None
        tls_label = "true" if meshed else "no_identity"
        server_id = info.peer_identity or "" if meshed else ""
        self.metrics.opened(link, (self.direction, "dst", tls_label, "", server_id))
        return link

    async def _handshake(self, link: Link, identity: str) -> HandshakeInfo:
        assert self.tls is not None
        session = self.tls.client_session(identity)
        link.on_handshake = self._count_handshake
        try:
            return await link.handshake(session)
        except TLSError as e:
            link.abort()
            raise UpstreamError(f"mesh TLS to {identity} failed: {e}") from None

    def _count_handshake(self, link: Link, info: HandshakeInfo | None, error: Any) -> None:
        if info is not None:
            self.metrics.tls_handshakes_total.inc((self.direction, info.group, "ok"))
        else:
            group = (link.tls.group if link.tls else None) or "none"
            self.metrics.tls_handshakes_total.inc((self.direction, group, handshake_result(error)))


class _IdleSink:
    """Owns a pooled link while it is idle: any data, EOF or close evicts it."""

    __slots__ = ("key", "link", "pool", "since")

    def __init__(self, pool: Pool, key: Any, link: Link, since: float) -> None:
        self.pool, self.key, self.link, self.since = pool, key, link, since

    def data_received(self, data: bytes) -> None:
        self.pool.evict(self)  # an idle HTTP/1 connection must not speak first

    def eof_received(self) -> None:
        self.pool.evict(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.pool.evict(self)

    def link_retired(self) -> None:
        self.pool.evict(self)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class Pool:
    """Idle keep-alive links by key, most recently used first."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        idle_timeout: float = POOL_IDLE_TIMEOUT,
        max_idle_per_key: int = 256,
    ) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[Any, list[_IdleSink]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, key: Any) -> Link | None:
        """An idle link for ``key``, or None (the caller then dials a new one)."""
        stack = self._idle.get(key)
        while stack:
            entry = stack.pop()
            link = entry.link
            if not link.closed and not link.eof and not link.retired:
                link.sink = NULL_SINK
                return link
        return None

    def put(self, key: Any, link: Link) -> None:
        """Return a link whose last exchange completed cleanly."""
        if link.closed or link.eof or link.retired:
            self._close(link)
            return
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        elif len(stack) >= self.max_idle_per_key:
            self._close(link)
            return
        # A link goes in and out of the pool once per request: its entry is made once.
        entry = link.parked
        if entry is None or entry.pool is not self:
            entry = link.parked = _IdleSink(self, key, link, self._clock())
        else:
            entry.key = key
            entry.since = self._clock()
        link.sink = entry
        # A link parks reading. A slow client may have paused it while the last bytes of the
        # response were already in: parked paused, it would miss its peer closing it, and the
        # next request taken over it would never read its answer.
        link.resume_reading()
        stack.append(entry)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)

    def evict(self, entry: _IdleSink) -> None:
        stack = self._idle.get(entry.key)
        if stack and entry in stack:
            stack.remove(entry)
        self._close(entry.link)

    def idle_count(self, key: Any = None) -> int:
        """Idle links in the pool, or (``key``) of that key."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(s) for s in self._idle.values())

    def close_all(self) -> None:
        for stack in self._idle.values():
            for entry in stack:
                self._close(entry.link)
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self._clock() - self.idle_timeout
        for key, stack in list(self._idle.items()):
            keep = [e for e in stack if e.since > deadline]
            for entry in stack:
                if entry.since <= deadline:
                    self._close(entry.link)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)

    def _close(self, link: Link) -> None:
        link.sink = NULL_SINK
        link.close()
