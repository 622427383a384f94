"""A lean load generator for unary gRPC calls: pre-encoded HTTP/2 frames over asyncio.

grpc.aio costs ~250 µs of CPU per call on the benchmark machine, as much as a third of what the
server under test spends, and it shares the same cores. This client sends each distinct request
as one HEADERS frame (a constant HPACK block: literals, no dynamic table) and one DATA frame
written straight to the socket, and reads responses by frame type only. A call counts as
answered when its stream ends after a DATA frame carried a response message; a gRPC error comes
back as a trailers-only response (no DATA), a reset or a GOAWAY, and counts as failed. The
response messages are returned so the caller can check them outside the timed section.

Flow control: the client opens its receive windows wide once; its sends wait for the server's
connection window (the requests are far below any stream window).
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_RECEIVE_WINDOW = 1 << 30


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def _literal(value: bytes) -> bytes:
    if len(value) > 126:  # one-byte HPACK length prefix is enough for these headers
        raise ValueError("header value too long for this client")
    return bytes((len(value),)) + value


def header_block(authority: str, path: str) -> bytes:
    """HPACK for a gRPC POST: static-table pseudo-headers and never-indexed literals."""
    return (
        b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
        + b"\x04" + _literal(path.encode())  # :path, name from the static table
        + b"\x01" + _literal(authority.encode())  # :authority
        + b"\x00" + _literal(b"content-type") + _literal(b"application/grpc")
        + b"\x00" + _literal(b"te") + _literal(b"trailers")
    )  # fmt: skip


@dataclass
class Outcome:
    """What one run measured: per-call latencies, failures and the response messages."""

    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    responses: list[bytes] = field(default_factory=list)


class _Connection(asyncio.Protocol):
    def __init__(self, block: bytes, in_flight: int, outcome: Outcome) -> None:
        self._block = block
        self._pending: list[bytes] = []
        self._in_flight = in_flight
        self._outcome = outcome
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._window = 65535  # the server's connection window for our DATA
        self._next_stream = 1
        self._open: dict[int, tuple[float, bytearray]] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = struct.pack(">HI", 0x4, _RECEIVE_WINDOW)  # SETTINGS_INITIAL_WINDOW_SIZE
        transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _RECEIVE_WINDOW - 65535))
        )

    def start(self, requests: list[bytes]) -> None:
        """Begin sending ``requests``; ``done`` resolves when all are answered or failed."""
        self._pending = list(reversed(requests))
        self.done = asyncio.get_running_loop().create_future()
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        out = bytearray()
        now = time.perf_counter()
        while self._pending and len(self._open) < self._in_flight:
            message = self._pending[-1]
            data = b"\0" + len(message).to_bytes(4, "big") + message
            if len(data) > self._window:
                break  # wait for the server's WINDOW_UPDATE
            self._pending.pop()
            self._window -= len(data)
            stream = self._next_stream
            self._next_stream += 2
            out += _frame(_HEADERS, _END_HEADERS, stream, self._block)
            out += _frame(_DATA, _END_STREAM, stream, data)
            self._open[stream] = (now, bytearray())
        if out:
            self._transport.write(out)
        if not self._pending and not self._open and not self.done.done():
            self.done.set_result(None)

    def _finish(self, stream: int) -> None:
        entry = self._open.pop(stream, None)
        if entry is None:
            return
        started, body = entry
        self._outcome.latencies.append(time.perf_counter() - started)
        if len(body) > 5:
            self._outcome.responses.append(bytes(body[5:]))
        else:
            self._outcome.errors += 1

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        replies = bytearray()
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if kind == _DATA:
                entry = self._open.get(stream)
                if entry is not None:
                    entry[1].extend(payload)
                if flags & _END_STREAM:
                    self._finish(stream)
            elif kind == _HEADERS:
                if flags & _END_STREAM:
                    self._finish(stream)
            elif kind == _RST_STREAM:
                self._open.get(stream, (0.0, bytearray()))[1].clear()
                self._finish(stream)
            elif kind == _WINDOW_UPDATE and stream == 0:
                self._window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif kind == _SETTINGS and not flags & _ACK:
                replies += _frame(_SETTINGS, _ACK, 0, b"")
            elif kind == _PING and not flags & _ACK:
                replies += _frame(_PING, _ACK, 0, bytes(payload))
            elif kind == _GOAWAY:
                self._fail_all()
                return
        del buf[:pos]
        if replies and self._transport is not None:
            self._transport.write(replies)
        self._send()

    def _fail_all(self) -> None:
        self._outcome.errors += len(self._open) + len(self._pending)
        self._open.clear()
        self._pending.clear()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all()


async def run(
    host: str,
    port: int,
    path: str,
    requests: list[bytes],
    *,
    connections: int,
    in_flight: int,
    timeout: float = 120.0,
) -> Outcome:
    """Send ``requests`` over ``connections`` connections, at most ``in_flight`` calls open on
    each; return when every call is answered or failed. Connections are set up before timing."""
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    block = header_block(f"{host}:{port}", path)
    shares = [requests[i::connections] for i in range(connections)]
    protocols = [_Connection(block, in_flight, outcome) for _ in shares]
    transports = []
    for proto in protocols:  # all connections are set up before the clock starts

        def factory(p: _Connection = proto) -> _Connection:
            return p

        transport, _ = await loop.create_connection(factory, host, port)
        transports.append(transport)
    start = time.perf_counter()
    for proto, share in zip(protocols, shares, strict=True):
        proto.start(share)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), timeout)
    finally:
        outcome.seconds = time.perf_counter() - start
        for t in transports:
            t.close()
    return outcome
