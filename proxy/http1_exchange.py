"""The parts of an HTTP/1 exchange that both halves of the proxy's codec share.

:class:`Exchange` is one request/response pair as it moves through the proxy:
:class:`proxy.http1.Http1Server` (the client side) fills it from the request and
:class:`proxy.http1_response.Response` (the upstream side) relays the answer to it.
:class:`Dispatcher` is what a listener supplies to route and account for exchanges. The
header rules both directions apply (hop-by-hop names, the head size bound) live here too.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from proxy.link import Link
from proxy.routes import OutboundRule
from proxy.transfer_coding import TransferDecoder

HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"l5d-client-id")
)  # fmt: skip
# A request or response head (request line or status line, and headers) larger than this is
# refused: httptools buffers a header until it ends, so without a bound one endless header line
# would grow the proxy's memory without limit.
MAX_HEAD_BYTES = 64 * 1024
# End-to-end header fields of a request (431 beyond) or response (502 beyond) forwarded at
# most (hop-by-hop ones are not counted): each costs a parser callback here and work at the
# other end; Linkerd's proxy (hyper) and Envoy stop at 100 too.
MAX_HEADERS = 100


class SpentParser:
    """Stands in for the httptools parser of a codec whose connection has ended.

    A parser holds its owner's bound callbacks, a reference cycle with the owner: the codec
    swaps its parser for this when done, so that reference counting frees it, its link and
    the link's TLS state as soon as the last other reference goes, not at the next full
    garbage collection. Nothing is fed to a spent codec; feeding this is a bug, said loudly.
    """

    __slots__ = ()

    def feed_data(self, data: bytes) -> None:
        raise RuntimeError("an HTTP/1 codec was fed data after its connection ended")


SPENT_PARSER: Any = SpentParser()


def without_headers(head: list[bytes], names: tuple[bytes, ...]) -> list[bytes]:
    """``head`` (groups of name, ``: ``, value, CRLF) minus the headers called ``names``."""
    kept: list[bytes] = []
    for i in range(0, len(head), 4):
        if head[i].lower() not in names:
            kept += head[i : i + 4]
    return kept


class ResponseProgress(Protocol):
    """How far the response to an exchange has got, as the client side needs to know it
    (:class:`proxy.http1_response.Response` is the one implementation)."""

    head_sent: bool
    done: bool
    decoder: TransferDecoder | None

    def decode_more(self) -> None:
        """Go on writing the decoded body to the client, which has drained."""


class Exchange:
    """One request/response pair as it moves through the proxy."""

    __slots__ = (
        "authority", "client_10", "close_after", "conn_tokens", "drop_left", "dropping",
        "extra_headers", "head", "head_bytes", "is_head", "keep_alive", "link", "method",
        "pending", "pending_size", "replay", "req_done", "resp", "rule", "started", "target",
        "te", "timers", "tunnel_tail", "upgrade", "upgrade_to", "url",
    )  # fmt: skip

    def __init__(self) -> None:
        self.url = b""
        # The end-to-end request headers as they will be written: name, b": ", value, b"\r\n".
        self.head: list[bytes] = []
        self.conn_tokens: tuple[bytes, ...] = ()
        self.upgrade_to = b""
        self.method = b""
        self.authority = ""
        # The Transfer-Encoding codings, forwarded as they came; non-empty means a chunked
        # body (llhttp refuses a request whose last coding is not chunked).
        self.te = b""
        self.head_bytes = 0  # received while the head is incomplete (bounded by MAX_HEAD_BYTES)
        self.upgrade = False
        self.is_head = False
        self.keep_alive = True
        self.client_10 = False
        self.req_done = False
        self.dropping = False  # answered before its end: the rest of its body is dropped
        self.drop_left = 0  # while dropping: bytes of it still read before the connection closes
        self.close_after = False
        self.pending: list[bytes] | None = []
        self.pending_size = 0
        self.link: Link | None = None
        self.resp: ResponseProgress | None = None
        self.target: Any = None  # the dispatcher's choice
        self.extra_headers = b""  # added by the dispatcher, e.g. l5d-client-id
        self.started = 0.0
        self.tunnel_tail = b""
        # The route rule the dispatcher matched, when it has timeouts or retries; the timers
        # armed for its timeouts; what is kept of the request to send it again.
        self.rule: OutboundRule | None = None
        self.timers: list[asyncio.TimerHandle] | None = None
        self.replay: Replay | None = None


class Replay:
    """What a request that may be retried has sent so far (its body as framed on the wire),
    kept to send it again, and how many times it was sent again (a bodiless idempotent request
    sent again after its pooled connection closed has one too, with nothing kept)."""

    __slots__ = ("chunks", "limit", "reason", "resent", "size", "tries")

    def __init__(self, pending: list[bytes] | None, limit: int) -> None:
        self.chunks = list(pending or ())
        self.size = sum(map(len, self.chunks))
        self.limit = limit
        self.tries = 0  # retries sent
        self.reason = ""  # why the last one was: a status, or the try's timeout
        self.resent = False  # sent again after a pooled connection closed under it

    def record(self, data: bytes) -> bool:
        """Keep ``data``; False once the request is over the limit (it cannot be retried)."""
        self.chunks.append(data)
        self.size += len(data)
        return self.size <= self.limit


class Dispatcher(Protocol):
    """What a listener supplies: routing, upstream connections and accounting."""

    def describe(self) -> str:
        """The side and the client, for a log line: ``outbound`` or ``inbound from <id>``."""

    def begin(self, ex: Exchange, now: float) -> None:
        """Route ``ex`` (set ``target``, maybe ``extra_headers`` and ``rule``; these may be
        set in ``connect`` instead, while the route is being resolved) or raise a ProxyError.
        Called again for each retry of the request (``replay.tries`` says which)."""

    def take(self, ex: Exchange) -> Link | None:
        """A pooled upstream link for ``ex.target``, if one is idle."""

    async def connect(self, ex: Exchange) -> Link:
        """A new upstream link for ``ex.target`` (raises ProxyError)."""

    def response_head(self, ex: Exchange, status: int, now: float) -> None:
        """The response head arrived (or an error response was made): count it."""

    def finish(self, ex: Exchange, link: Link | None, reusable: bool) -> None:
        """The exchange ended; pool ``link`` when ``reusable``, else close it."""


def request_headers(ex: Exchange) -> list[tuple[str, str]]:
    """A request's headers as policy judges them: every value in order (repeated headers
    are judged both ways), none that the client's Connection header names, as those never
    reach the application."""
    head = ex.head
    return [
        (head[i].decode("latin-1"), head[i + 2].decode("latin-1"))
        for i in range(0, len(head), 4)
        if head[i].lower() not in ex.conn_tokens
    ]


def request_path(url: bytes) -> str:
    """The path and query of a request target: origin form as is, absolute form without its
    scheme and authority (``*`` and authority form stay, and match no path)."""
    text = url.decode("latin-1")
    scheme_end = text.find("://")
    if scheme_end > 0 and "/" not in text[:scheme_end]:
        # The authority ends at the first '/', '?' or '#' (RFC 3986 3.2): in
        # "http://h?x=/public" the path is empty ("/"), not "/public".
        rest = text[scheme_end + 3 :]
        end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
        path = rest[end:]
        return path if path.startswith("/") else "/" + path
    return text
