"""A gRPC client channel over HTTP/2 and TLS 1.3: the proxy's connection to its control plane.

The sidecar calls two gRPC services: identity (unary ``Certify``) and destination (server
streams). grpcio's client would bring its C core into every proxy (12 MiB of library pages
resident, seven more threads); this channel is the part of gRPC a proxy needs, on the TLS the
data plane already uses (:func:`proxy.meshtls.control_plane_session`: TLS 1.3, the key
exchange per ``--kex``, the service's chain verified against the trust bundle and its name
checked) and h2's HTTP/2 state machine:

- unary and server-streaming calls; deadlines sent as ``grpc-timeout``; statuses from the
  trailers or a trailers-only answer (:mod:`proxy.grpc_frames`);
- one connection at a time per channel, made on first use and made again after it fails;
- keepalive PINGs (every 10 s, 3 s to answer: a peer gone silent fails its calls UNAVAILABLE
  instead of leaving a stream waiting forever);
- GOAWAY drains the connection: the calls the server says it saw (stream ids up to its
  last-stream-id) go on to their end, the others fail UNAVAILABLE saying the server never
  processed them, new calls go to a new connection, and the connection closes once its last
  call ends. h2 reads no frame after a GOAWAY, so the channel reads GOAWAY frames itself and
  never hands them to h2;
- closing the channel ends its open calls with CANCELLED;
- targets as gRPC names them (:func:`proxy.settings.parse_target`), and each TLS handshake
  reported to the channel's ``on_handshake`` (:data:`HandshakeObserver`).

It implements :class:`protos.rpc.Channel`; the calls raise :class:`protos.rpc.RpcError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, NoAvailableStreamIDError, TooManyStreamsError

from protos.rpc import RpcError, StatusCode
from proxy.errors import ConfigError, TLSError, handshake_result
from proxy.grpc_frames import (
    FrameSplitter,
    MessageReader,
    call_status,
    frame,
    has_status,
    request_headers,
    response_error,
)
from proxy.meshtls import TlsSession, control_plane_session, split_pem_certificates
from proxy.settings import KexPolicy, parse_target

log = logging.getLogger(__name__)

KEEPALIVE = 10.0  # Linkerd's proxy pings its control plane every 10 s
KEEPALIVE_TIMEOUT = 3.0
MAX_KEEPALIVE = 300.0  # grpc servers' default minimum interval between pings
CONNECT_TIMEOUT = 10.0

_GOAWAY = 0x7  # the HTTP/2 frame type

_RESET_CODES: dict[int, StatusCode] = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


# Told of every TLS handshake a channel makes: (server name, negotiated group or "none",
# result: ok, kex_refused, alpn_refused, identity_mismatch, timeout, cancelled or error).
HandshakeObserver = Callable[[str, str, str], None]


class _Call:
    """One call's stream: the messages received and not yet read, then its outcome."""

    __slots__ = (
        "_waiter", "conn", "ended", "error", "messages", "reader", "status", "status_seen",
        "stream_id",
    )  # fmt: skip

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.messages: collections.deque[bytes] = collections.deque()
        self.reader = MessageReader()
        self.status: RpcError | None = None  # the server's, once ``status_seen``
        self.status_seen = False
        self.ended = False
        self.error: RpcError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def deliver(self, messages: list[bytes]) -> None:
        if messages and not self.ended:
            self.messages.extend(messages)
            self._wake()

    def finish(self, error: RpcError | None) -> None:
        if not self.ended:
            self.ended, self.error = True, error
            self._wake()

    async def next(self) -> bytes | None:
        """The next message; None after an OK status; raises the call's error."""
        while True:
            if self.messages:
                return self.messages.popleft()
            if self.ended:
                if self.error is not None:
                    raise self.error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def cancel(self) -> None:
        if not self.ended:
            self.conn.reset(self.stream_id)
            self.finish(RpcError(StatusCode.CANCELLED, "the call was cancelled"))


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection (over TLS when ``tls`` is given) carrying a channel's calls."""

    def __init__(
        self,
        target: str,
        authority: str,
        tls: TlsSession | None,
        *,
        keepalive: float,
        keepalive_timeout: float,
        on_closed: Callable[[_Connection], None],
        on_handshake: Callable[[str, str], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.target = target
        self.authority = authority
        self.tls = tls
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.calls: dict[int, _Call] = {}
        self.established: asyncio.Future[None] = loop.create_future()
        # Nobody may be waiting when a connection fails before use; never an unretrieved error.
        self.established.add_done_callback(_consume)
        self.failure: RpcError | None = None
        self.draining = False  # after GOAWAY: no new calls
        self.goaway: str | None = None  # the server's GOAWAY, as told to the calls it ends
        self.too_many_pings = False  # the server's GOAWAY said we ping too often
        self._frames = FrameSplitter()
        self.transport: asyncio.Transport | None = None
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout
        self._keepalive_task: asyncio.Task[None] | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._window_waiters: list[asyncio.Future[None]] = []
        self._on_closed = on_closed
        self._on_handshake = on_handshake  # (group, result), once per TLS handshake begun
        self._handshake_counted = tls is None

    @property
    def usable(self) -> bool:
        return self.failure is None and not self.draining and self.established.done()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but they are ones.
        self.transport = cast(asyncio.Transport, transport)
        if self.tls is None:
            self._start_http2()
            return
        try:
            self.transport.write(self.tls.start())
        except TLSError as e:
            self.count_handshake(handshake_result(e))
            self._fail(_unavailable(f"TLS with {self.target} failed: {e}"))

    def data_received(self, data: bytes) -> None:
        try:
            if self.tls is not None:
                plaintext, out = self.tls.feed(data)
                if out and self.transport is not None:
                    self.transport.write(out)
                if not self.established.done() and self.tls.info is not None:
                    self.count_handshake("ok")
                    self._start_http2()
            else:
                plaintext = data
            for chunk in self._frames.feed(plaintext) if plaintext else ():
                if self.failure is not None:
                    break
                if chunk[3] == _GOAWAY and len(chunk) >= 17 and chunk[5:9] == b"\0\0\0\0":
                    self._goaway(chunk)  # (a malformed one goes to h2, which refuses it)
                    continue
                for event in self.h2.receive_data(chunk):
                    self._event(event)
            self._flush()
            if self.tls is not None and self.tls.closed:
                self._fail(_unavailable(f"{self.target} closed the TLS connection"))
        except TLSError as e:
            self.count_handshake(handshake_result(e))
            if self.tls is not None and self.transport is not None:
                self.transport.write(self.tls.drain())  # our alert says why, before we close
            self._fail(_unavailable(f"TLS with {self.target} failed: {e}"))
        except H2Error as e:
            self._fail(
                RpcError(StatusCode.INTERNAL, f"HTTP/2 protocol error from {self.target}: {e}")
            )

    def eof_received(self) -> bool:
        self._fail(self._closed_error(f"{self.target} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self._fail(self._closed_error(f"the connection to {self.target} was lost{why}"))
        self._on_closed(self)

    def _closed_error(self, what: str) -> RpcError:
        # After a GOAWAY the server's reason is the news, not the close that follows it.
        return _unavailable(f"{self.goaway} before the call ended" if self.goaway else what)

    # --- HTTP/2 ----------------------------------------------------------------------------

    def _start_http2(self) -> None:
        self.h2.initiate_connection()
        self._flush()
        self.established.set_result(None)
        if self._keepalive > 0:
            self._keepalive_task = asyncio.ensure_future(self._keep_alive())

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            try:
                transport.write(self.tls.encrypt(data) if self.tls is not None else data)
            except TLSError as e:  # the calls waiting on this connection learn it from _fail
                self._fail(_unavailable(f"TLS with {self.target} failed: {e}"))

    def _event(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            # Read whole as it comes: the window reopens at once (a call's messages are small,
            # and the caller reads each as it arrives).
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None and event.data:
                try:
                    call.deliver(call.reader.feed(event.data))
                except RpcError as e:
                    self._end(call, e, reset=True)
        elif isinstance(event, ResponseReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                headers = _text(event.headers)
                error = response_error(headers)
                if error is not None:
                    self._end(call, error, reset=True)
                elif has_status(headers):  # trailers-only: the end of the stream follows
                    call.status, call.status_seen = call_status(headers), True
        elif isinstance(event, TrailersReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.status, call.status_seen = call_status(_text(event.headers)), True
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                outcome = call.status
                if not call.status_seen:
                    outcome = RpcError(
                        StatusCode.INTERNAL, "the server ended the call without a grpc-status"
                    )
                elif outcome is None and call.reader.partial:
                    outcome = RpcError(StatusCode.INTERNAL, "the call ended inside a message")
                self._end(call, outcome, reset=False)
        elif isinstance(event, StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                code = _RESET_CODES.get(event.error_code, StatusCode.INTERNAL)
                name = getattr(event.error_code, "name", event.error_code)
                self._end(call, RpcError(code, f"the server reset the call ({name})"), reset=False)
        elif isinstance(event, PingAckReceived):
            waiter = self._pings.pop(event.ping_data, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._wake_senders()

    def _goaway(self, goaway: bytes) -> None:
        # A GOAWAY frame: 9-byte header, last-stream-id (31 bits), error code, debug data.
        last = int.from_bytes(goaway[9:13], "big") & 0x7FFF_FFFF
        code = int.from_bytes(goaway[13:17], "big")
        extra = goaway[17:].decode("utf-8", "replace")
        try:
            name = ErrorCodes(code).name
        except ValueError:
            name = f"error code {code:#x}"
        self.draining = True
        self.too_many_pings = self.too_many_pings or (
            code == ErrorCodes.ENHANCE_YOUR_CALM and extra == "too_many_pings"
        )
        reason = f"{self.target} closed the connection (GOAWAY {name} {extra})".replace(" )", ")")
        self.goaway = reason
        if code != ErrorCodes.NO_ERROR:
            log.warning("%s", reason)
        # A second GOAWAY may lower the last stream id (gRPC servers send 2^31-1, then the
        # real one), never raise it; the calls above it were never processed.
        for stream_id in [s for s in self.calls if s > last]:
            self._end(
                self.calls[stream_id],
                _unavailable(f"{reason}; the call was not processed"),
                reset=False,
            )
        self._close_if_drained(f"{reason} before the call ended")

    def _close_if_drained(self, why: str | None = None) -> None:
        """After a GOAWAY (or the last stream id), close once the last call has ended."""
        if self.draining and not self.calls:
            self.close(_unavailable(why or f"the connection to {self.target} was closed"))

    def _end(self, call: _Call, error: RpcError | None, *, reset: bool) -> None:
        if reset:
            self.reset(call.stream_id)
        self.calls.pop(call.stream_id, None)
        call.finish(error)
        self._close_if_drained()

    def reset(self, stream_id: int) -> None:
        """Cancel one stream (the caller abandoned it, or its answer was refused)."""
        self.calls.pop(stream_id, None)
        if self.failure is None:
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self._flush()
        self._close_if_drained()

    # --- calls -----------------------------------------------------------------------------

    async def start(self, method: str, request: bytes, timeout: float | None) -> _Call:
        """Open a call and send its one request message (waiting for flow-control window)."""
        if not self.usable:
            raise self.failure or _unavailable(f"the connection to {self.target} is closing")
        headers = request_headers(method, self.authority, tls=self.tls is not None, timeout=timeout)
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers)
        except NoAvailableStreamIDError:
            self.draining = True
            raise _unavailable(
                f"the connection to {self.target} has used every stream id"
            ) from None
        except TooManyStreamsError:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{self.target} allows no more concurrent calls on this connection",
            ) from None
        call = _Call(self, stream_id)
        self.calls[stream_id] = call
        body = frame(request)
        try:
            while body:
                if call.ended:
                    raise call.error or _unavailable("the call ended before its request was sent")
                window = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    await self._window()
                    continue
                chunk, body = body[:window], body[window:]
                self.h2.send_data(stream_id, chunk, end_stream=not body)
                self._flush()
        except BaseException:
            call.cancel()
            raise
        return call

    async def _window(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        await waiter

    def _wake_senders(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while self.failure is None:
            await asyncio.sleep(self._keepalive)
            data = os.urandom(8)
            waiter = loop.create_future()
            self._pings[data] = waiter
            self.h2.ping(data)
            self._flush()
            try:
                async with asyncio.timeout(self._keepalive_timeout):
                    await waiter
            except TimeoutError:
                self._fail(
                    _unavailable(
                        f"{self.target} did not answer a keepalive ping within "
                        f"{self._keepalive_timeout:g}s"
                    )
                )
                return

    # --- the end ---------------------------------------------------------------------------

    def count_handshake(self, result: str) -> None:
        """Report this connection's TLS handshake once: ``ok`` or why it failed."""
        if self._handshake_counted or self.transport is None or self.tls is None:
            return  # plaintext, counted already, or no TCP connection to shake hands on
        self._handshake_counted = True
        if self._on_handshake is not None:
            info = self.tls.info
            group = info.group if info is not None else self.tls.group
            self._on_handshake(group or "none", result)

    def close(self, error: RpcError) -> None:
        """Close politely (GOAWAY, close_notify); the calls still open end with ``error``."""
        self.count_handshake("cancelled")
        if self.failure is None and self.established.done():
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
                self._flush()
            if self.tls is not None and self.transport is not None:
                with contextlib.suppress(TLSError):
                    self.transport.write(self.tls.close_notify())
        self._fail(error)

    def _fail(self, error: RpcError) -> None:
        if self.failure is not None:
            return
        self.count_handshake("error")  # the peer closed, or the connection broke, mid-handshake
        self.failure = error
        if not self.established.done():
            self.established.set_exception(error)
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.finish(error)
        self._wake_senders()
        for waiter in self._pings.values():
            waiter.cancel()
        self._pings.clear()
        task = self._keepalive_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _text(headers: object) -> list[tuple[str, str]]:
    # The connection decodes header fields as UTF-8 (header_encoding), so they are str.
    return cast(list[tuple[str, str]], headers)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _unavailable(details: str) -> RpcError:
    return RpcError(StatusCode.UNAVAILABLE, details)


class _ServerStream:
    """A server-streaming call, opened on first iteration."""

    def __init__(self, channel: Channel, method: str, request: bytes) -> None:
        self._channel = channel
        self._method = method
        self._request = request
        self._call: _Call | None = None
        self._cancelled = False

    def __aiter__(self) -> _ServerStream:
        return self

    async def __anext__(self) -> bytes:
        if self._cancelled:
            raise StopAsyncIteration
        if self._call is None:
            conn = await self._channel._connection(self._channel.connect_timeout)
            self._call = await conn.start(self._method, self._request, None)
        message = await self._call.next()
        if message is None:
            raise StopAsyncIteration
        return message

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


class Channel:
    """gRPC calls to ``target`` (``host:port``); see the module's docstring.

    Plaintext (HTTP/2 with prior knowledge) without ``server_name``; with it, TLS 1.3 verified
    against ``roots_pem`` for that name.
    """

    def __init__(
        self,
        target: str,
        *,
        roots_pem: bytes | None = None,
        server_name: str | None = None,
        kex: KexPolicy = KexPolicy.HYBRID_REQUIRED,
        keepalive: float = KEEPALIVE,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_handshake: HandshakeObserver | None = None,
    ) -> None:
        self.address = parse_target(target)
        if server_name is not None and roots_pem is None:
            raise ValueError(f"TLS to {server_name} needs the trust anchors (roots_pem)")
        if keepalive < 0 or keepalive_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("keepalive must be >= 0; its timeout and connect_timeout positive")
        self.target = target
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        # Parsed once (a bundle with no certificate is refused now), used by every connection.
        self._anchors = (
            split_pem_certificates(roots_pem)
            if server_name is not None and roots_pem is not None
            else []
        )
        self._kex = kex
        self._on_handshake = on_handshake
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout
        self._current: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._connections: set[_Connection] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def group(self) -> str | None:
        """The key-exchange group of the current connection (None: plaintext or none yet)."""
        conn = self._current
        tls = conn.tls if conn is not None else None
        return tls.info.group if tls is not None and tls.info is not None else None

    async def _connection(self, timeout: float) -> _Connection:
        if self._closed:
            raise RpcError(StatusCode.CANCELLED, "the channel is closed")
        current = self._current
        if current is not None and current.usable:
            return current
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._connect(timeout))
            connecting.add_done_callback(self._connected)
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if connecting.cancelled() and task is not None and not task.cancelling():
                # close() abandoned the connect under us: the call fails, its task goes on.
                raise RpcError(StatusCode.CANCELLED, "the channel was closed") from None
            raise

    def _connected(self, task: asyncio.Future[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        _consume(task)  # type: ignore[arg-type]

    async def _connect(self, timeout: float) -> _Connection:
        tls = None
        if self.server_name is not None:
            try:
                tls = control_plane_session(self._anchors, self.server_name, kex=self._kex)
            except ConfigError as e:
                raise _unavailable(f"cannot set up TLS to {self.target}: {e}") from None
        conn = _Connection(
            self.target,
            self.server_name or self.target,
            tls,
            keepalive=self._keepalive,
            keepalive_timeout=self._keepalive_timeout,
            on_closed=self._connection_closed,
            on_handshake=self._handshake_observer(),
        )
        try:
            async with asyncio.timeout(timeout):
                await self._open(conn)
                self._connections.add(conn)
                await conn.established
        except TimeoutError:
            conn.count_handshake("timeout")
            conn.close(_unavailable("connect timed out"))
            raise _unavailable(f"cannot connect to {self.target} within {timeout:g}s") from None
        except OSError as e:
            raise _unavailable(f"cannot connect to {self.target}: {e.strerror or e}") from None
        except BaseException as e:
            conn.close(_unavailable("connect abandoned"))
            raise e
        if self._closed:
            conn.close(RpcError(StatusCode.CANCELLED, "the channel was closed"))
            raise RpcError(StatusCode.CANCELLED, "the channel is closed")
        self._current = conn
        return conn

    def _handshake_observer(self) -> Callable[[str, str], None] | None:
        observer, server = self._on_handshake, self.server_name
        if observer is None or server is None:
            return None
        return lambda group, result: observer(server, group, result)

    async def _open(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        if self.address.path is not None:
            await loop.create_unix_connection(lambda: conn, self.address.path)
            return
        last: OSError | None = None
        for host, port in self.address.addresses:  # each name's addresses, then the next
            try:
                await loop.create_connection(lambda: conn, host, port)
                return
            except OSError as e:
                last = e
        assert last is not None
        raise last

    def _connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.too_many_pings and 0 < self._keepalive < MAX_KEEPALIVE:
            # As gRPC's own clients do: the server's ping policy is stricter than our interval.
            self._keepalive = min(self._keepalive * 2, MAX_KEEPALIVE)
            log.warning(
                "%s refused our keepalive pings as too frequent; pinging every %gs from now on",
                self.target,
                self._keepalive,
            )

    async def unary(self, method: str, request: bytes, *, timeout: float) -> bytes:
        if timeout <= 0:
            raise ValueError("a unary call needs a positive timeout")
        call: _Call | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection(timeout)
                call = await conn.start(method, request, timeout)
                response = await call.next()
                if response is None:
                    raise RpcError(StatusCode.INTERNAL, f"{method} answered OK with no message")
                if await call.next() is not None:
                    raise RpcError(StatusCode.INTERNAL, f"{method} answered a unary call twice")
                return response
        except TimeoutError:
            if call is not None:
                call.cancel()
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED, f"{method}: no answer within {timeout:g}s"
            ) from None
        except BaseException:
            if call is not None:
                call.cancel()
            raise

    def stream(self, method: str, request: bytes) -> _ServerStream:
        return _ServerStream(self, method, request)

    async def ready(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connection(self.connect_timeout)
                return
            except RpcError:
                if self._closed:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        closed = RpcError(StatusCode.CANCELLED, "the channel was closed")
        for conn in list(self._connections):
            conn.close(closed)
        self._connections.clear()
        self._current = None

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def channel_factory(
    kex: KexPolicy, on_handshake: HandshakeObserver | None = None
) -> Callable[..., Channel]:
    """A :class:`protos.rpc.ChannelFactory` whose channels use ``kex`` and report each TLS
    handshake to ``on_handshake``."""

    def open_channel(target: str, *, roots_pem: bytes | None, server_name: str | None) -> Channel:
        return Channel(
            target,
            roots_pem=roots_pem,
            server_name=server_name,
            kex=kex,
            on_handshake=on_handshake,
        )

    return open_channel


__all__ = ["CONNECT_TIMEOUT", "KEEPALIVE", "Channel", "HandshakeObserver", "channel_factory"]
