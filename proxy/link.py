"""One socket as the rest of the proxy sees it: an asyncio protocol with optional mesh TLS.

A :class:`Link` hands the plaintext it receives to its ``sink``, any object with the
``asyncio.Protocol`` callback names (``data_received``, ``eof_received``, ``connection_lost``,
``pause_writing``, ``resume_writing``). The sink is swapped as the connection changes role
(detector, HTTP codec, idle in a pool, opaque relay). TLS is started in place with
:meth:`start_tls`, after detection has seen the ClientHello, or right after connecting.
The hot path is one method call per read and per write; counters are plain ints.
"""

from __future__ import annotations

import asyncio
import errno as errno_names
import socket
import struct
from typing import Any, cast

from proxy.errors import TLSError
from proxy.meshtls import HandshakeInfo, TlsSession

_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class NullSink:
    """Ignores everything; used while a link has no owner (e.g. closing)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


NULL_SINK = NullSink()


class Link(asyncio.Protocol):
    """A TCP connection, plaintext or mesh TLS, delivering plaintext to ``sink``."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "codec",
        "eof",
        "on_handshake",
        "parked",
        "peer",
        "retire_timer",
        "retired",
        "sink",
        "tls",
        "tracker",
        "transport",
        "write_paused",
    )

    def __init__(self, sink: Any = NULL_SINK) -> None:
        self.sink: Any = sink
        self.transport: asyncio.Transport | None = None
        self.tls: TlsSession | None = None
        self.on_handshake: Any = None  # optional callback(link, info | None, error | None)
        self.peer: tuple[str, int] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.eof = False
        # Per-connection protocol state an owner keeps across uses; release() when it closes.
        self.codec: Any = None
        self.parked: Any = None  # the pool's entry for this link, kept for its next visit
        self.write_paused = False
        self.tracker: Any = None  # metrics: told once when the connection closes
        # Retired: it may finish what it carries, but takes no new exchange (see retire_at).
        self.retired = False
        self.retire_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (peer[0], peer[1])

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        tls = self.tls
        if tls is None:
            self.sink.data_received(data)
            return
        was_done = tls.info is not None
        try:
            plaintext, out = tls.feed(data)
        except TLSError as e:
            self._handshake_failed(e)
            return
        if out:
            self._raw_write(out)
        if not was_done and tls.info is not None:
            self._handshake_done(tls.info)
        if plaintext:
            self.sink.data_received(plaintext)
        if tls.closed and not self.eof:
            self.eof = True
            self.sink.eof_received()

    def eof_received(self) -> bool:
        if self.tls is not None and self.tls.info is None:
            self._handshake_failed(TLSError("the peer closed the connection during the handshake"))
            return False
        if not self.eof:
            self.eof = True
            self.sink.eof_received()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.retire_timer is not None:
            self.retire_timer.cancel()  # else it would keep the closed link alive until then
            self.retire_timer = None
        if self.tracker is not None:
            self.tracker.closed(self, _errno(exc))
            self.tracker = None
        if self.tls is not None and self.tls.info is None and self.on_handshake is not None:
            self._handshake_failed(TLSError("the connection closed during the handshake"))
        else:
            self.sink.connection_lost(exc)
        self._release()

    def _release(self) -> None:
        """Drop what the closed link points to. Its owners point back at it (``sink.link``),
        and a cycle waits for a full garbage collection, which in a proxy tuned for throughput
        comes rarely: until then the TLS session (OpenSSL's connection state, traffic keys
        included) and the codecs outlived the connection by minutes to hours."""
        self.sink = NULL_SINK
        codec, self.codec = self.codec, None
        if codec is not None:
            codec.release()
        self.parked = None
        self.on_handshake = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.sink.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        # Not from inside this callback: asyncio's selector transport calls it from its write
        # handler, and a close() the sink makes here (a response finishing as it is decoded)
        # is then completed twice, the second time on a torn-down transport. Rare (only after
        # backpressure), so the one loop iteration costs nothing.
        asyncio.get_running_loop().call_soon(self._resume_sink)

    def _resume_sink(self) -> None:
        if not self.closed and not self.write_paused:
            self.sink.resume_writing()

    # -- what owners call -------------------------------------------------------------------

    def retire_at(self, when: float) -> None:
        """From loop time ``when`` on (the peer certificate's expiry), the link is retired: an
        idle owner is told (``link_retired()``, e.g. the pool, which closes it) and a busy one
        sees ``retired`` when it would hand the link on."""
        loop = asyncio.get_running_loop()
        self.retire_timer = loop.call_at(when, self.retire)

    def retire(self) -> None:
        """Retire the link now (see :meth:`retire_at`)."""
        if self.retire_timer is not None:
            self.retire_timer.cancel()
        self.retire_timer = None
        self.retired = True
        retired = getattr(self.sink, "link_retired", None)
        if retired is not None:
            retired()

    def start_tls(self, session: TlsSession, buffered: bytes = b"") -> None:
        """Run ``session`` over this link from now on; ``buffered`` is data already read.

        ``on_handshake(link, info, None)`` or ``on_handshake(link, None, error)`` is called once
        the handshake ends; after a failure the link is closed.
        """
        self.tls = session
        try:
            hello = session.start()
        except TLSError as e:
            self._handshake_failed(e)
            return
        if hello:
            self._raw_write(hello)
        if buffered:
            self.bytes_in -= len(buffered)  # counted once already, as plaintext
            self.data_received(buffered)

    async def handshake(self, session: TlsSession) -> HandshakeInfo:
        """Start ``session`` and wait for its handshake (raises TLSError)."""
        waiter = _HandshakeWaiter(self.on_handshake)
        self.on_handshake = waiter
        self.start_tls(session)
        try:
            return await waiter.future
        finally:
            if self.on_handshake is waiter:  # cancelled while the handshake goes on
                self.on_handshake = waiter.previous
            # A failure's traceback holds this frame, and the frame the future holding the
            # failure: a cycle that would keep the link and its TLS state until a full
            # garbage collection.
            del waiter

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self.tls is not None:
            try:
                data = self.tls.encrypt(data)
            except TLSError:
                self.abort()
                return
        self.bytes_out += len(data)
        self.transport.write(data)

    def write_eof(self) -> None:
        """Half-close: no more data from us (close_notify first when over TLS)."""
        if self.closed or self.transport is None:
            return
        if self.tls is not None:
            alert = self.tls.close_notify()
            if alert:
                self._raw_write(alert)
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Close at once with a reset: a FIN would let a peer reading a body to EOF take what
        it got for the whole of it."""
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                except OSError:
                    pass
            self.transport.abort()

    # -- internals --------------------------------------------------------------------------

    def _raw_write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.bytes_out += len(data)
            self.transport.write(data)

    def _handshake_done(self, info: HandshakeInfo) -> None:
        callback, self.on_handshake = self.on_handshake, None
        if callback is not None:
            callback(self, info, None)

    def _handshake_failed(self, error: TLSError) -> None:
        callback, self.on_handshake = self.on_handshake, None
        if callback is not None:
            callback(self, None, error)
        # Send the alert the session queued, so the peer learns why, then drop the connection.
        if self.transport is not None and not self.closed:
            if self.tls is not None:
                alert = self.tls.drain()
                if alert:
                    self._raw_write(alert)
            self.transport.close()
        self.closed = True
        self.sink.connection_lost(error)


class _HandshakeWaiter:
    """The ``on_handshake`` callback of :meth:`Link.handshake`: settles its future, after
    calling the callback that was there before."""

    __slots__ = ("future", "previous")

    def __init__(self, previous: Any) -> None:
        self.future: asyncio.Future[HandshakeInfo] = asyncio.get_running_loop().create_future()
        self.previous = previous

    def __call__(self, link: Link, info: HandshakeInfo | None, error: TLSError | None) -> None:
        if self.previous is not None:
            self.previous(link, info, error)
        if self.future.done():
            return
        if info is not None:
            self.future.set_result(info)
        else:
            self.future.set_exception(error or TLSError("handshake failed"))


def _errno(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno_names.errorcode.get(exc.errno, str(exc.errno))
    return ""
