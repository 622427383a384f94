"""Protocol detection on the first bytes of a connection, without I/O.

``detect(buffer)`` answers :data:`NEED_MORE` while the bytes seen so far are consistent with
more than one verdict, and a :class:`Detected` once they are not. The verdicts, in Linkerd's
order: a TLS ClientHello (with its SNI, when the whole hello fits in :data:`MAX_TLS_BYTES`),
the HTTP/2 client preface, an HTTP/1.x request line, otherwise opaque. The driver owns the
detection timeout: a client that stays silent is relayed as opaque TCP when it fires.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Linkerd reads up to 1 KiB for HTTP detection and buffers up to 8 KiB of a ClientHello.
MAX_HTTP_LINE: Final = 1024
MAX_TLS_BYTES: Final = 8192

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [^\x00-\x20\x7f]+ HTTP/1\.[01]\r?\n")
_METHOD_PREFIX = re.compile(_TOKEN)
_TARGET_PREFIX = re.compile(rb"[^\x00-\x20\x7f]*")


class Proto(enum.Enum):
    """What a connection carries."""

    TLS = "tls"
    HTTP1 = "http/1"
    HTTP2 = "h2"
    OPAQUE = "opaque"


@dataclass(frozen=True, slots=True)
class Detected:
    """A decided protocol; ``sni`` is the ClientHello's server name for TLS, when present."""

    proto: Proto
    sni: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.proto, Proto):
            raise TypeError(f"proto must be a Proto, not {type(self.proto).__name__}")
        if self.sni is not None and self.proto is not Proto.TLS:
            raise ValueError("sni is only meaningful for a TLS connection")


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()
"""Returned while the buffer is a prefix of more than one possible verdict."""

OPAQUE: Final = Detected(Proto.OPAQUE)
HTTP1: Final = Detected(Proto.HTTP1)
HTTP2: Final = Detected(Proto.HTTP2)


def detect(buffer: bytes, *, eof: bool = False) -> Detected | _NeedMore:
    """Classify the first bytes of a connection.

    With ``eof=True`` (the peer closed, or the driver gives up waiting) an undecided buffer
    is opaque. Never raises on any input.
    """
    if not buffer:
        return OPAQUE if eof else NEED_MORE
    first = buffer[0]
    if first == 0x16:
        verdict = _detect_tls(buffer)
    elif first == 0x50 and (buffer.startswith(H2_PREFACE) or H2_PREFACE.startswith(buffer)):
        verdict = HTTP2 if len(buffer) >= len(H2_PREFACE) else NEED_MORE
    else:
        verdict = _detect_http1(buffer)
    if eof and verdict is NEED_MORE:
        return OPAQUE
    return verdict


def _detect_http1(buffer: bytes) -> Detected | _NeedMore:
    end = buffer.find(b"\n", 0, MAX_HTTP_LINE)
    if end >= 0:
        return HTTP1 if _REQUEST_LINE.fullmatch(buffer, 0, end + 1) else OPAQUE
    if len(buffer) >= MAX_HTTP_LINE:
        # A request line longer than the window (a long URL, a big query string) is HTTP/1
        # when what fits is a method, a space and the start of a target, as Linkerd assumes;
        # the HTTP/1 server then bounds the whole head.
        window = buffer[:MAX_HTTP_LINE]
        _, sp, target = window.partition(b" ")
        return HTTP1 if sp and target and _is_request_line_prefix(window) else OPAQUE
    return NEED_MORE if _is_request_line_prefix(buffer) else OPAQUE


def _is_request_line_prefix(line: bytes) -> bool:
    """True when ``line`` (no newline yet) can still grow into a valid request line."""
    method, sp, rest = line.partition(b" ")
    if not _METHOD_PREFIX.fullmatch(method):
        return False
    if not sp:
        return True
    target, sp, version = rest.partition(b" ")
    if not _TARGET_PREFIX.fullmatch(target) or (sp and not target):
        return False
    if not sp:
        return True
    if version.endswith(b"\r"):
        version = version[:-1]
        return version in (b"HTTP/1.0", b"HTTP/1.1")
    return b"HTTP/1.1".startswith(version) or b"HTTP/1.0".startswith(version)


def _detect_tls(buffer: bytes) -> Detected | _NeedMore:
    """Reassemble the ClientHello from handshake records and read its SNI."""
    hello = bytearray()
    pos = 0
    needed: int | None = None  # 4 + the ClientHello length, once its header is seen
    while needed is None or len(hello) < needed:
        if pos + 5 > len(buffer):
            return _tls_need_more(buffer)
        if buffer[pos] != 0x16 or buffer[pos + 1] != 0x03 or buffer[pos + 2] > 0x04:
            return OPAQUE if pos == 0 else Detected(Proto.TLS)
        length = int.from_bytes(buffer[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384:
            return OPAQUE if pos == 0 else Detected(Proto.TLS)
        hello += buffer[pos + 5 : pos + 5 + length]
        if needed is None and len(hello) >= 4:
            if hello[0] != 0x01:  # a handshake record, but not a ClientHello
                return OPAQUE
            needed = 4 + int.from_bytes(hello[1:4], "big")
            if needed > MAX_TLS_BYTES - 5:  # too big to buffer: TLS, SNI unknown
                return Detected(Proto.TLS)
        if pos + 5 + length > len(buffer):
            return _tls_need_more(buffer)
        pos += 5 + length
    return Detected(Proto.TLS, _client_hello_sni(bytes(hello[4:needed])))


def _tls_need_more(buffer: bytes) -> Detected | _NeedMore:
    # A hello bigger than we are willing to buffer is still TLS, just without an SNI.
    return Detected(Proto.TLS) if len(buffer) >= MAX_TLS_BYTES else NEED_MORE


def _client_hello_sni(body: bytes) -> str | None:
    """The host_name of the server_name extension, or None when absent or malformed."""
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        if end > len(body):
            return None
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            data = body[pos + 4 : pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type != 0:
                continue
            # server_name_list: u16 length, then (u8 type, u16 length, name)*
            at = 2
            while at + 3 <= len(data):
                name_type = data[at]
                name_len = int.from_bytes(data[at + 1 : at + 3], "big")
                name = data[at + 3 : at + 3 + name_len]
                at += 3 + name_len
                if name_type == 0 and len(name) == name_len and name:
                    return name.decode("ascii") if name.isascii() else None
            return None
    except IndexError:
        return None
    return None
