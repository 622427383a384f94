"""gRPC over HTTP/2, the parts without I/O: request headers, message framing, call status.

gRPC carries each message as a 5-byte prefix (a compressed flag, then the length as a 32-bit
big-endian integer) and the message; a call's outcome comes in the trailers (``grpc-status``,
``grpc-message`` percent-encoded), or in the response headers alone when the server answers
with no message ("trailers-only"). An HTTP status other than 200 is mapped to a gRPC code as
gRPC's HTTP/2 protocol document says. :mod:`proxy.rpc` drives these over a connection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from urllib.parse import unquote

from protos.rpc import RpcError, StatusCode

# What grpcio's channels accept by default; a destination update or a trust bundle is far below.
MAX_MESSAGE = 4 * 1024 * 1024
_PREFIX = struct.Struct(">BI")

# gRPC's mapping of HTTP statuses for responses that are not gRPC (a proxy, a wrong port).
_HTTP_STATUS = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def request_headers(
    method: str, authority: str, *, tls: bool, timeout: float | None
) -> list[tuple[str, str]]:
    """The HEADERS of a call to ``method`` (``/package.Service/Method``)."""
    if not method.startswith("/") or method.count("/") != 2:
        raise ValueError(f"a gRPC method is /package.Service/Method, not {method!r}")
    headers = [
        (":method", "POST"),
        (":scheme", "https" if tls else "http"),
        (":path", method),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "trustmesh-proxy"),
    ]
    if timeout is not None:
        headers.append(("grpc-timeout", encode_timeout(timeout)))
    return headers


def encode_timeout(seconds: float) -> str:
    """``grpc-timeout``: at most 8 digits and a unit; rounded up, so never shorter."""
    if seconds <= 0:
        raise ValueError("a gRPC timeout must be positive")
    for unit, scale in (("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = -int(-seconds * scale // 1)  # ceil
        if value < 100_000_000:
            return f"{max(value, 1)}{unit}"
    return "99999999H"


def frame(message: bytes) -> bytes:
    """One uncompressed length-prefixed message."""
    return _PREFIX.pack(0, len(message)) + message


class MessageReader:
    """Cuts the DATA of one response into messages as bytes arrive.

    Raises :class:`RpcError` for what a client must not accept: a compressed message (no
    ``grpc-encoding`` was negotiated) or one over ``limit``, refused from its prefix alone.
    """

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        messages = []
        while len(buf) >= 5:
            compressed, length = _PREFIX.unpack_from(buf)
            if compressed:
                raise RpcError(StatusCode.INTERNAL, "the server sent a compressed message unasked")
            if length > self.limit:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"a response message of {length} bytes exceeds the limit of {self.limit}",
                )
            if len(buf) < 5 + length:
                break
            messages.append(bytes(buf[5 : 5 + length]))
            del buf[: 5 + length]
        return messages

    @property
    def partial(self) -> bool:
        """True while a message has begun and not ended (the call cannot end OK then)."""
        return bool(self._buf)


class FrameSplitter:
    """Cuts received HTTP/2 bytes at frame boundaries (a 9-byte header with a 24-bit length).

    h2 takes any bytes, but a batch that ends in an error loses the events decoded before it:
    fed one frame at a time, a GOAWAY is seen (with its reason) before the frames h2 refuses
    after it.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames = []
        start = 0
        while len(buf) - start >= 9:
            end = start + 9 + int.from_bytes(buf[start : start + 3], "big")
            if end > len(buf):
                break
            frames.append(bytes(buf[start:end]))
            start = end
        del buf[:start]
        return frames


def response_error(headers: Iterable[tuple[str, str]]) -> RpcError | None:
    """The error a call's response headers announce, or None when they start a gRPC answer."""
    fields = dict(headers)
    status = fields.get(":status", "")
    if status != "200":
        code = _HTTP_STATUS.get(int(status) if status.isdigit() else 0, StatusCode.UNKNOWN)
        return RpcError(code, f"the server answered HTTP status {status or 'none'}, not gRPC")
    content_type = fields.get("content-type", "")
    if not content_type.startswith("application/grpc"):
        return RpcError(
            StatusCode.UNKNOWN, f"the server answered content-type {content_type!r}, not gRPC"
        )
    return None


def call_status(trailers: Iterable[tuple[str, str]]) -> RpcError | None:
    """None for OK, else the error the trailers (or a trailers-only answer) carry."""
    fields = dict(trailers)
    raw = fields.get("grpc-status")
    if raw is None:
        return RpcError(StatusCode.INTERNAL, "the server ended the call without a grpc-status")
    try:
        code = StatusCode(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    if code is StatusCode.OK:
        return None
    return RpcError(code, unquote(fields.get("grpc-message", ""), errors="replace"))


def has_status(headers: Iterable[tuple[str, str]]) -> bool:
    return any(name == "grpc-status" for name, _ in headers)


__all__ = [
    "MAX_MESSAGE",
    "FrameSplitter",
    "MessageReader",
    "call_status",
    "encode_timeout",
    "frame",
    "has_status",
    "request_headers",
    "response_error",
]
