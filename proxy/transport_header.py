"""The mesh-hop transport header (Linkerd's ``transport.l5d.io/v1``), encoded and decoded purely.

When a client proxy opens a mesh-TLS connection to a peer proxy's inbound port with ALPN
``transport.l5d.io/v1`` negotiated, its first plaintext bytes are::

    b"transport.l5d.io/v1\\r\\n\\r\\n"   preface (21 bytes)
    u32 big-endian length              of the message that follows (at most 64 KiB here)
    protobuf transport.l5d.io.Header   port (1, int32), name (2, string),
                                       session_protocol (3, message: http1 = 1 | http2 = 2)

The peer forwards the rest of the stream to ``localhost:<port>``; ``session_protocol`` absent
means opaque bytes. The protobuf is written and read here by hand (five fields, no generated
code on the hot path) and unknown fields are skipped, as protobuf requires.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from proxy.errors import TransportHeaderError

ALPN: Final = b"transport.l5d.io/v1"
PREFACE: Final = b"transport.l5d.io/v1\r\n\r\n"
MAX_HEADER_LEN: Final = 65536


class SessionProtocol(enum.IntEnum):
    """The ``SessionProtocol.kind`` oneof: field number of the chosen variant."""

    HTTP1 = 1
    HTTP2 = 2


@dataclass(frozen=True, slots=True)
class TransportHeader:
    """Where the peer proxy should send the stream that follows the header."""

    port: int
    name: str | None = None
    protocol: SessionProtocol | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise TypeError(f"port must be an int, not {type(self.port).__name__}")
        if not 0 < self.port < 65536:
            raise TransportHeaderError(f"target port {self.port} is not between 1 and 65535")
        if self.name is not None and (not self.name or len(self.name) > 253):
            raise TransportHeaderError("name must be a non-empty hostname of at most 253 bytes")
        if self.protocol is not None and not isinstance(self.protocol, SessionProtocol):
            raise TypeError("protocol must be a SessionProtocol or None")

    def encode(self) -> bytes:
        """The preface, length prefix and protobuf message, ready to write after the handshake."""
        msg = bytearray(b"\x08")
        msg += _varint(self.port)
        if self.name is not None:
            raw = self.name.encode("ascii")
            msg += b"\x12" + _varint(len(raw)) + raw
        if self.protocol is not None:
            # SessionProtocol { <variant> = empty message }: tag, zero length.
            inner = bytes([(self.protocol << 3) | 2, 0])
            msg += b"\x1a" + _varint(len(inner)) + inner
        return PREFACE + len(msg).to_bytes(4, "big") + bytes(msg)


def decode(buffer: bytes) -> tuple[TransportHeader, int] | None:
    """Parse a header at the start of ``buffer``.

    Returns ``(header, bytes consumed)``, or ``None`` while more bytes are needed. Raises
    :class:`TransportHeaderError` as soon as the bytes cannot be a valid header.
    """
    have = min(len(buffer), len(PREFACE))
    if buffer[:have] != PREFACE[:have]:
        raise TransportHeaderError(
            "the connection does not start with the transport header preface"
        )
    start = len(PREFACE) + 4
    if len(buffer) < start:
        return None
    length = int.from_bytes(buffer[len(PREFACE) : start], "big")
    if length > MAX_HEADER_LEN:
        raise TransportHeaderError(f"transport header of {length} bytes exceeds {MAX_HEADER_LEN}")
    if len(buffer) < start + length:
        return None
    return _parse_header(buffer[start : start + length]), start + length


def _parse_header(msg: bytes) -> TransportHeader:
    port: int | None = None
    name: str | None = None
    protocol: SessionProtocol | None = None
    for field, value in _fields(msg):
        if field == 1 and isinstance(value, int):
            port = value
        elif field == 2 and isinstance(value, bytes):
            try:
                name = value.decode("ascii") or None
            except UnicodeDecodeError:
                raise TransportHeaderError("transport header name is not ASCII") from None
        elif field == 3 and isinstance(value, bytes):
            for kind, _ in _fields(value):
                if kind in (1, 2):
                    protocol = SessionProtocol(kind)
    if port is None:
        raise TransportHeaderError("transport header has no target port")
    if port >= 1 << 63:  # int32 fields carry negatives as 64-bit two's complement
        port -= 1 << 64
    return TransportHeader(port, name, protocol)


def _fields(msg: bytes) -> list[tuple[int, int | bytes]]:
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(msg):
        key, pos = _read_varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(msg, pos)
            out.append((field, value))
        elif wire == 2:
            size, pos = _read_varint(msg, pos)
            if pos + size > len(msg):
                raise TransportHeaderError("transport header field runs past its message")
            out.append((field, msg[pos : pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(msg):
                raise TransportHeaderError("transport header field runs past its message")
        else:
            raise TransportHeaderError(f"transport header has unsupported wire type {wire}")
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(msg: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(msg):
            raise TransportHeaderError("transport header ends inside a varint")
        byte = msg[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
    raise TransportHeaderError("transport header varint is longer than 10 bytes")
