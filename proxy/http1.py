"""HTTP/1.1 forwarding with httptools: keep-alive, streamed bodies, pooled upstreams, upgrades.

:class:`Http1Server` is the sink of a client connection. It parses requests with httptools
(measured ~20x cheaper than h11 per exchange), asks its :class:`Dispatcher` where each one
goes (a fresh choice per request), and streams the request and response bodies through as
they arrive: nothing is buffered whole. Bodies are re-framed (chunked stays chunked, with any
other transfer codings kept; Content-Length stays as is); hop-by-hop headers and those named in
``Connection`` are dropped. A request two parsers could frame or route differently (llhttp's
strict checks: Content-Length with Transfer-Encoding, duplicate lengths, folded or malformed
lines; more than one Host, or none in HTTP/1.1) gets 400 naming the problem, a head over
:data:`~proxy.http1_exchange.MAX_HEAD_BYTES` or with more than
:data:`~proxy.http1_exchange.MAX_HEADERS` header fields 431. An absolute-form target's authority
replaces Host, and so does a CONNECT's ``host:port``. A ``101 Switching Protocols`` answer to an
``Upgrade`` request (WebSocket), or a 2xx answer to a CONNECT, hands both connections to an
opaque :class:`~proxy.tcp.Relay`. Pipelined requests are answered in order, one upstream
exchange at a time.

This module is the client (request) side and the one other code imports from. The upstream
side, which parses the response and relays it back, is :mod:`proxy.http1_response`; what both
sides share (:class:`~proxy.http1_exchange.Exchange`, the :class:`Dispatcher` interface, the
header rules) is :mod:`proxy.http1_exchange`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque

import httptools

from pki.errors import quoted
from pki.names import port_number
from proxy.errors import (
    Forbidden,
    HeaderFieldsTooLarge,
    MalformedRequest,
    NoEndpoints,
    ProxyError,
    RequestTimeout,
    TLSError,
    UnknownRoute,
    UpstreamError,
)
from proxy.http1_exchange import (
    HOP_BY_HOP,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    SPENT_PARSER,
    Dispatcher,
    Exchange,
    Replay,
    without_headers,
)
from proxy.http1_response import Response
from proxy.link import Link
from proxy.lograte import PeerLog
from proxy.settings import HEAD_TIMEOUT
from proxy.tcp import Relay

# Exchange and MAX_HEAD_BYTES live in proxy.http1_exchange; listeners and tests import them
# from here, with the server.
__all__ = [
    "MAX_DROPPED_BODY",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_PENDING_BODY",
    "MAX_PIPELINED",
    "Exchange",
    "Http1Server",
    "LingeringClose",
    "error_status",
]

MAX_PENDING_BODY = 1 << 20  # pause the client while this much body waits for an upstream
# Requests of one client connection parsed ahead of their answers at most (pipelining);
# reading resumes once half have been answered.
MAX_PIPELINED = 64
# A request refused before its end whose body is at most this long is read and dropped, and
# its connection kept; a longer one (or a chunked one) closes the connection.
MAX_DROPPED_BODY = 64 * 1024

# Requests the proxy answered itself (refused, or the upstream failed): a client can cause
# them, so the lines are rate limited.
failure_log = PeerLog(logging.getLogger(__name__))

# The one place where proxy errors become HTTP statuses (Linkerd's errors/respond.rs).
_STATUS: tuple[tuple[type[ProxyError], int, bytes], ...] = (
    (Forbidden, 403, b"Forbidden"),
    (UnknownRoute, 404, b"Not Found"),
    (NoEndpoints, 503, b"Service Unavailable"),
    (UpstreamError, 502, b"Bad Gateway"),
    (TLSError, 502, b"Bad Gateway"),
    (RequestTimeout, 504, b"Gateway Timeout"),
)


_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def _has_body(ex: Exchange) -> bool:
    """Whether the request declared a body (Content-Length other than 0; chunked is ``te``)."""
    head = ex.head
    return any(
        head[i].lower() == b"content-length" and head[i + 2].strip() != b"0"
        for i in range(0, len(head), 4)
    )


def _current(ex: Exchange, attempt: int) -> bool:
    """Whether try number ``attempt`` of ``ex`` is the one in progress (not given up on)."""
    replay = ex.replay
    return replay is None or replay.tries == attempt


def error_status(error: ProxyError) -> tuple[int, bytes]:
    for cls, status, phrase in _STATUS:
        if isinstance(error, cls):
            return status, phrase
    return 500, b"Internal Server Error"


def _absolute_form(ex: Exchange) -> None:
    """An absolute-form target (``GET http://host/path``): its authority wins, and the Host
    field is replaced by it (RFC 9112 3.2.2), so that the proxy and the app see one authority."""
    rest = ex.url.partition(b"://")[2]
    authority = rest.partition(b"/")[0].partition(b"?")[0].partition(b"#")[0]
    if not authority:
        raise MalformedRequest("the absolute-form request target has no authority")
    if b"@" in authority:
        raise MalformedRequest("the request target carries user information (RFC 9110 4.2.4)")
    ex.authority = authority.decode("latin-1")
    ex.head = [*without_headers(ex.head, (b"host",)), b"Host", b": ", authority, b"\r\n"]


def _body_to_drop(ex: Exchange) -> int | None:
    """How much of a refused request's body to read and drop so that the connection stays: 0
    without a body (RFC 9112 6.3), its declared length up to MAX_DROPPED_BODY, and up to
    MAX_DROPPED_BODY of a chunked one (its size shows only as it comes; beyond that the
    connection closes then). None when it must close now: a declared length over
    MAX_DROPPED_BODY, or a body that may never come (``Expect: 100-continue``: the client waits
    for an answer it has had). Read only when a request is refused, off the forwarding path."""
    length = 0
    head = ex.head
    for i in range(0, len(head), 4):
        name = head[i].lower()
        if name == b"content-length":
            length = int(head[i + 2])  # llhttp accepted it: digits
        elif name == b"expect" and head[i + 2].strip().lower() == b"100-continue":
            return None
    if ex.te:  # chunked (llhttp refuses a request whose codings do not end with it)
        return MAX_DROPPED_BODY
    return length if length <= MAX_DROPPED_BODY else None


def _decline_h2c(ex: Exchange) -> None:
    """Drop ``h2c`` from an upgrade offer, as Linkerd's proxy does: after it the connection
    would carry HTTP/2 the proxy could only relay, with no request after the first authorized.
    With nothing else offered the request goes on as plain HTTP/1.1 (a client must accept
    that), its ``HTTP2-Settings`` dropped as the ``Connection`` header names it."""
    offered = [t for t in ex.upgrade_to.split(b",") if t.strip().lower() != b"h2c"]
    ex.upgrade_to = b",".join(offered).strip()
    ex.upgrade = bool(ex.upgrade_to)


def _authority_form(ex: Exchange) -> None:
    """A CONNECT target is ``host:port`` (RFC 9112 3.2.3), the authority the request goes to:
    as with absolute form, it replaces Host, so that the proxy and the app see one authority."""
    target = ex.url
    host, colon, port = target.rpartition(b":")
    if (
        not colon
        or not host
        or port_number(port.decode("latin-1")) is None
        or any(c in target for c in b"/?#@")
        or (host.startswith(b"[") != host.endswith(b"]"))
    ):
        raise MalformedRequest(
            f"a CONNECT request target must be host:port (RFC 9112 3.2.3), "
            f"not {quoted(target.decode('latin-1'))}"
        )
    ex.authority = target.decode("latin-1")
    ex.head = [*without_headers(ex.head, (b"host",)), b"Host", b": ", target, b"\r\n"]


class Http1Server:
    """Serves HTTP/1 requests arriving on ``link`` by forwarding them through ``dispatcher``."""

    __slots__ = (
        "_loop", "cancel_on_eof", "declined", "dispatcher", "head_timeout", "head_timer", "link",
        "parser", "parsing", "paused", "piped", "queue", "refusal",
    )  # fmt: skip

    def __init__(
        self,
        link: Link,
        dispatcher: Dispatcher,
        early: bytes = b"",
        head_timeout: float = HEAD_TIMEOUT,
        *,
        cancel_on_eof: bool = False,
    ) -> None:
        self.link = link
        self.head_timeout = head_timeout
        # The client is a mesh proxy, which closes with a request in progress only to give it
        # up (a route timeout, or its own client gone): then the request is cut here too.
        self.cancel_on_eof = cancel_on_eof
        self.head_timer: asyncio.TimerHandle | None = None  # armed while a head is arriving
        self.dispatcher = dispatcher
        self._loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.paused = False  # reading held: a body waits for its upstream connection
        self.piped = False  # reading held: MAX_PIPELINED requests wait for their answers
        self.refusal = b""  # a refusal waiting for the answers to the requests before it
        self.declined = False  # the request being parsed offered only h2c (see on_headers_complete)
        link.sink = self
        if early:
            self.data_received(early)

    # -- client side: httptools request callbacks -------------------------------------------

    def data_received(self, data: bytes) -> None:
        before = self.parsing  # a head this read continues, if any
        while True:
            if self.refusal:
                return  # refused: nothing after the bad request is parsed
            try:
                self.parser.feed_data(data)
                break
            except httptools.HttpParserUpgrade as e:
                rest = data[e.args[0] :]
            except httptools.HttpParserCallbackError as e:
                cause = e.__context__
                if isinstance(cause, MalformedRequest):
                    self._bad_request(str(cause), cause.status)
                else:
                    self._bad_request(str(cause or e))
                return
            except httptools.HttpParserError as e:
                self._bad_request(str(e))
                return
            if not self.declined:  # llhttp stopped after an Upgrade or CONNECT request
                if self.queue:  # else refused and answered: nothing to tunnel
                    self.queue[-1].tunnel_tail = rest
                    self.link.pause_reading()  # nothing more to parse until it is answered
                return
            # A declined h2c offer: llhttp stopped after that request, which is complete. The
            # requests after it go to a fresh parser (one turn of the loop per declined offer).
            self.declined = False
            if self.parser is SPENT_PARSER:  # answered and handed on meanwhile
                return
            self.parser = httptools.HttpRequestParser(self)
            data = rest
        parsing = self.parsing
        if parsing is not None and not parsing.method:  # the head is still arriving
            if self.head_timer is None:
                self.head_timer = self._loop.call_later(self.head_timeout, self._head_timed_out)
            if parsing is not before:
                # It began in this read, after the requests pipelined before it: where is not
                # known, so this read is not counted (it bounds itself). Counting it whole made
                # a client that pipelines over 64 KiB of small requests get a 431.
                return
            parsing.head_bytes += len(data)
            if parsing.head_bytes > MAX_HEAD_BYTES:
                self._bad_request(
                    f"request head over {MAX_HEAD_BYTES} bytes",
                    b"431 Request Header Fields Too Large",
                )

    def on_url(self, url: bytes) -> None:
        # The first callback of every request (a request line always has a target): no
        # on_message_begin, which would cost one more call per request.
        ex = self.parsing
        if ex is None:
            ex = self.parsing = Exchange()
        ex.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                ex.conn_tokens += tuple(t.strip().lower() for t in value.split(b","))
            elif lname == b"transfer-encoding":
                # llhttp refuses a request whose last coding is not chunked, and one that
                # also has Content-Length (no request smuggling through the proxy). Codings
                # in several fields are one list, in order (RFC 9110 5.3).
                te = value.strip()
                ex.te = b"%b, %b" % (ex.te, te) if ex.te else te
            elif lname == b"upgrade":
                ex.upgrade_to = value
            return
        if lname == b"host":
            if ex.authority:  # RFC 9112 3.2: the proxy and the app could disagree on which
                raise MalformedRequest("more than one Host header")
            ex.authority = value.decode("latin-1")
        ex.head += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if len(ex.head) > 4 * MAX_HEADERS:  # counted once here: MAX_HEAD_BYTES bounds the list
            raise HeaderFieldsTooLarge(f"more than {MAX_HEADERS} header fields")
        parser = self.parser
        ex.method = parser.get_method()
        ex.is_head = ex.method == b"HEAD"
        ex.keep_alive = parser.should_keep_alive()
        ex.client_10 = parser.get_http_version() == "1.0"
        ex.upgrade = parser.should_upgrade()
        if ex.upgrade and ex.method != b"CONNECT":
            _decline_h2c(ex)
            if not ex.upgrade:
                self.declined = True
        if ex.upgrade and ex.method == b"CONNECT":
            _authority_form(ex)
        elif ex.url[:1] != b"/" and b"://" in ex.url:
            _absolute_form(ex)
        elif not ex.authority and not ex.client_10:
            raise MalformedRequest("an HTTP/1.1 request needs a Host header (RFC 9112 3.2)")
        queue = self.queue
        queue.append(ex)
        if len(queue) == 1:
            self._start(ex)
        elif len(queue) >= MAX_PIPELINED and not self.piped:
            # Answered one at a time: read no more requests until these drain, or a client
            # that pipelines without reading the answers grows the queue without end.
            self.piped = True
            self.link.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self._send_body(ex, b"%x\r\n%b\r\n" % (len(body), body) if ex.te else body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        ex.req_done = True
        if ex.te:
            self._send_body(ex, b"0\r\n\r\n")

    def _send_body(self, ex: Exchange, data: bytes) -> None:
        replay = ex.replay
        if replay is not None and not replay.record(data):
            ex.replay = None  # over the route's limit: this request is not sent again
        if ex.pending is None:
            link = ex.link
            if link is not None:
                link.write(data)
            elif ex.dropping:  # refused and answered: its body is read and dropped
                ex.drop_left -= len(data)
                if ex.drop_left < 0:  # a chunked body over MAX_DROPPED_BODY
                    ex.dropping = False
                    LingeringClose(self.link)
                    self._release()
            return
        ex.pending.append(data)
        ex.pending_size += len(data)
        if ex.pending_size > MAX_PENDING_BODY and not self.paused:
            self.paused = True
            self.link.pause_reading()

    # -- client link events -----------------------------------------------------------------

    def eof_received(self) -> None:
        if not self.queue:
            self.link.close()
        elif self.cancel_on_eof:
            # Its upstream is closed (connection_lost), so the application stops working on
            # a request nobody waits for. An ordinary HTTP/1.1 client may half-close and
            # still read its answer, so only a mesh proxy's close cancels.
            self.link.abort()

    def link_retired(self) -> None:
        """The peer's certificate has expired (``Link.retire_at``): no request is taken on this
        connection any more. Idle, it closes now; busy, after the answer in progress, which
        says ``connection: close``. (A relay has no such hook and keeps running: a stream
        cannot move to a new connection.)"""
        if not self.queue and self.parsing is None:
            self.link.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        while self.queue:
            ex = self.queue.popleft()
            self._disarm(ex)
            if ex.link is not None:
                self.dispatcher.finish(ex, ex.link, reusable=False)
                ex.link = None
            ex.resp = None
        self._release()

    def _release(self) -> None:
        # The parser holds our bound callbacks: a cycle that would keep this server, and the
        # link it references, until a full garbage collection. Called once the link is closed
        # or handed on (a relay, a lingering close): nothing reaches this server after that.
        self.parser = SPENT_PARSER

    def pause_writing(self) -> None:  # the client is slow: stop reading the upstream
        if self.queue and self.queue[0].link is not None:
            self.queue[0].link.pause_reading()

    def resume_writing(self) -> None:
        if not self.queue:
            return
        ex = self.queue[0]
        if not ex.started:  # held back by complete() while the client was not reading
            self._start(ex)
            return
        if ex.resp is not None and ex.resp.decoder is not None:
            ex.resp.decode_more()  # what is decoded already goes first
            if self.link.write_paused or not self.queue or self.queue[0] is not ex:
                return
        if ex.link is not None:
            ex.link.resume_reading()

    # -- forwarding -------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        ex.started = now = self._loop.time()
        try:
            self.dispatcher.begin(ex, now)
        except ProxyError as e:
            self.fail(ex, e)
            return
        if ex.rule is not None:
            self._arm(ex)
        link = self.dispatcher.take(ex)
        if link is not None:
            self._attach(ex, link)
        else:
            self._loop.create_task(self._connect(ex))

    async def _connect(self, ex: Exchange) -> None:
        replay = ex.replay
        attempt = replay.tries if replay is not None else 0
        try:
            link = await self.dispatcher.connect(ex)
        except ProxyError as e:
            if self.queue and self.queue[0] is ex and _current(ex, attempt):
                self.fail(ex, e)  # else dropped, or given up on, meanwhile: nobody to answer
            return
        if not _current(ex, attempt):  # this try timed out and the request went again
            link.close()
            return
        if self.link.closed or not self.queue or self.queue[0] is not ex:
            self.dispatcher.finish(ex, link, reusable=False)
            return
        if ex.rule is not None and ex.timers is None:  # routed while resolving
            self._arm(ex)
        self._attach(ex, link)

    # -- route timeouts and retries -----------------------------------------------------------

    def _arm(self, ex: Exchange) -> None:
        """Start the request timeout (counted from the start of the request) and the first
        try's; keep the request to send it again if the route retries."""
        rule = ex.rule
        assert rule is not None
        ex.timers = []
        if rule.timeouts.request is not None:
            ex.timers.append(
                self._loop.call_at(ex.started + rule.timeouts.request, self._timed_out, ex, -1)
            )
        if rule.retry is not None and ex.replay is None:
            ex.replay = Replay(ex.pending, rule.retry.max_request_bytes)
        self._arm_try(ex, ex.started)

    def _arm_try(self, ex: Exchange, at: float) -> None:
        rule = ex.rule
        assert rule is not None and ex.timers is not None
        limit = rule.try_timeout
        if limit is not None:
            attempt = ex.replay.tries if ex.replay is not None else 0
            ex.timers.append(self._loop.call_at(at + limit[0], self._timed_out, ex, attempt))

    @staticmethod
    def _disarm(ex: Exchange) -> None:
        timers = ex.timers
        if timers is not None:
            ex.timers = None
            for timer in timers:
                timer.cancel()

    def _timed_out(self, ex: Exchange, attempt: int) -> None:
        """A route timeout expired: the request timeout (``attempt`` -1), or the timeout of
        try number ``attempt``. Before the response head, a try that timed out is sent again
        if the route retries and allows one more, else the request is answered 504 (its
        upstream connection closed). After the head only the request timeout acts: the status
        is out, so the client connection is cut."""
        if self.link.closed or not self.queue or self.queue[0] is not ex:
            return
        if attempt >= 0 and not _current(ex, attempt):
            return  # an earlier try's timer
        rule, resp = ex.rule, ex.resp
        assert rule is not None
        if attempt < 0:
            seconds, name = rule.timeouts.request or 0.0, "request"
        else:
            seconds, name = rule.try_timeout or (0.0, "response")
        if resp is not None and resp.head_sent:
            if attempt >= 0:
                return  # the try's answer came in time
            self._disarm(ex)
            failure_log.info(
                "%s %s request to %s cut mid-response: the route's request timeout (%gs) "
                "expired",
                self.dispatcher.describe(), ex.method.decode("latin-1"), quoted(ex.authority),
                seconds,
            )  # fmt: skip
            self.link.abort()  # connection_lost ends the exchange; its upstream is not reused
            return
        if resp is not None:
            resp.done = True  # closing its upstream link must not answer the client again
        if attempt >= 0 and self.may_retry(ex):
            self.retry(ex, ex.link, 0, f"no response within the {name} timeout of {seconds:g}s")
            return
        self._disarm(ex)
        self.fail(
            ex,
            RequestTimeout(f"no response within the route's {name} timeout of {seconds:g}s"),
            ex.link,
        )

    def may_retry(self, ex: Exchange, status: int = 0) -> bool:
        """Whether ``ex`` can be sent again after this try (answered ``status``, or 0: timed
        out): its route retries (that status), the whole request came and was kept, and it has
        retries left."""
        rule, replay = ex.rule, ex.replay
        if rule is None or rule.retry is None or replay is None:
            return False
        if not ex.req_done or ex.upgrade or replay.tries >= rule.retry.max_retries:
            return False
        return not status or rule.retry.retries_status(status)

    def retry(self, ex: Exchange, upstream: Link | None, status: int, why: str) -> None:
        """Give this try up (``upstream`` is closed; an answer ``status`` still counts for its
        endpoint) and send the request again after the route's backoff, to the endpoint the
        dispatcher picks then."""
        replay = ex.replay
        assert replay is not None and ex.rule is not None and ex.rule.retry is not None
        if status:
            self.dispatcher.response_head(ex, status, self._loop.time())
        self.dispatcher.finish(ex, upstream, reusable=False)
        ex.link = ex.resp = None
        replay.tries += 1
        replay.reason = "timeout" if not status else "status"
        delay = ex.rule.retry.backoff(replay.tries, random.random())
        failure_log.info(
            "%s %s request to %s: %s; retry %d of %d in %.0f ms",
            self.dispatcher.describe(), ex.method.decode("latin-1"), quoted(ex.authority), why,
            replay.tries, ex.rule.retry.max_retries, delay * 1000.0,
        )  # fmt: skip
        self._loop.call_later(delay, self._send_again, ex, replay.tries)

    def resend(self, ex: Exchange, upstream: Link | None, why: str) -> bool:
        """A pooled upstream link closed before any byte of the answer: most likely its peer
        closed it idle just as the request went out. A request that is idempotent (RFC 9110
        9.2.2) and has no body is sent again, once, on a new connection to the same target;
        whether it was. (Other requests get the 502: they may have been acted on.)"""
        if self.link.closed or not self.queue or self.queue[0] is not ex or ex.upgrade:
            return False
        if ex.method not in _IDEMPOTENT or not ex.req_done or ex.te or _has_body(ex):
            return False
        if ex.replay is not None and ex.replay.resent:
            return False  # once
        self.dispatcher.finish(ex, upstream, reusable=False)
        ex.link = ex.resp = None
        if ex.replay is None:
            ex.replay = Replay(None, 0)
        ex.replay.resent = True
        failure_log.info(
            "%s %s request to %s: %s on a pooled connection; sent again on a new one",
            self.dispatcher.describe(), ex.method.decode("latin-1"), quoted(ex.authority), why,
        )  # fmt: skip
        ex.pending = []
        self._loop.create_task(self._connect(ex))
        return True

    def _send_again(self, ex: Exchange, attempt: int) -> None:
        if self.link.closed or not self.queue or self.queue[0] is not ex:
            return
        if not _current(ex, attempt):
            return
        replay = ex.replay
        assert replay is not None
        now = self._loop.time()
        try:
            self.dispatcher.begin(ex, now)
        except ProxyError as e:
            self._disarm(ex)
            self.fail(ex, e)
            return
        ex.pending = list(replay.chunks)  # _attach writes the head and these
        if ex.timers is not None:
            self._arm_try(ex, now)
        link = self.dispatcher.take(ex)
        if link is not None:
            self._attach(ex, link)
        else:
            self._loop.create_task(self._connect(ex))

    def _attach(self, ex: Exchange, link: Link) -> None:
        ex.link = link
        # A link that carried a response before keeps its codec: the parser sits at a message
        # boundary, so it is reused rather than rebuilt for every request.
        resp: Response | None = link.codec
        if resp is None:
            resp = Response()
            resp.begin(self, ex)
        else:
            link.codec = None  # given back by _finish when this exchange ends cleanly
            resp.begin(self, ex, reused=True)
        ex.resp = resp
        link.sink = resp
        head = self._request_head(ex)
        if ex.pending:
            head += ex.pending
        ex.pending = None
        link.write(b"".join(head))
        if self.paused:
            self.paused = False
            self._resume_reading()
        if link.closed or link.eof:  # the pooled link died while we were choosing it
            resp.eof_received()

    def _request_head(self, ex: Exchange) -> list[bytes]:
        parts = [ex.method, b" ", ex.url, b" HTTP/1.1\r\n"]
        tokens = ex.conn_tokens
        if tokens and not HOP_BY_HOP.issuperset(tokens):
            parts += without_headers(ex.head, tokens)  # ``Connection`` names more headers to drop
        else:
            parts += ex.head
        if ex.te:
            parts += (b"transfer-encoding: ", ex.te, b"\r\n")
        if ex.upgrade and ex.upgrade_to:
            parts += (b"connection: upgrade\r\nupgrade: ", ex.upgrade_to, b"\r\n")
        parts += (ex.extra_headers, b"\r\n")
        return parts

    def fail(self, ex: Exchange, error: ProxyError, link: Link | None = None) -> None:
        """Answer ``ex`` with the error's status and an ``l5d-proxy-error`` reason, and say
        so in the log (rate limited: a client can cause these)."""
        status, phrase = error_status(error)
        self.dispatcher.response_head(ex, status, self._loop.time())
        why = str(error).replace("\r", " ").replace("\n", " ")
        failure_log.info(
            "%s %s request to %s answered %d: %s",
            self.dispatcher.describe(),
            ex.method.decode("latin-1"),
            quoted(ex.authority),
            status,
            why,
        )
        reason = why.encode("latin-1", "replace")
        if not ex.req_done:
            # Refused before its end (routing, policy): if its body is small, read and drop it,
            # so that the connection, and the pooled mesh connection behind it, stay open.
            length = _body_to_drop(ex)
            if length == 0:
                ex.req_done = True  # its end follows its head at once
            elif length is not None:
                ex.dropping = True
                ex.drop_left = length
                ex.pending = None  # what still comes of it goes nowhere (see _send_body)
        # A request whose body we will not read cannot be followed by another on this
        # connection.
        close = not (ex.req_done or ex.dropping) or not ex.keep_alive or self.link.retired
        self.link.write(
            b"HTTP/1.1 %d %b\r\ncontent-length: 0\r\nl5d-proxy-error: %b\r\n%b\r\n"
            % (status, phrase, reason, b"connection: close\r\n" if close else b"")
        )
        ex.close_after = close
        self.complete(ex, link, reusable=False)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.link.closed and not self.refusal:
            self._bad_request(
                f"the request head was not complete within {self.head_timeout:g}s",
                b"408 Request Timeout",
                malformed=False,
            )

    def _bad_request(
        self, why: str, status: bytes = b"400 Bad Request", *, malformed: bool = True
    ) -> None:
        """Refuse what the client sent (before it was forwarded) and close the connection,
        once the requests pipelined before it are answered."""
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        reason = f"malformed HTTP/1.1 request: {why}" if malformed else why
        reason = reason.replace("\r", " ").replace("\n", " ")
        self.refusal = (
            b"HTTP/1.1 %b\r\ncontent-length: 0\r\nl5d-proxy-error: %b\r\nconnection: close\r\n\r\n"
            % (status, reason.encode("latin-1", "replace"))
        )
        self.link.pause_reading()  # until the lingering close drains it
        bad = self.parsing
        if bad is not None and bad in self.queue:
            # Its head was forwarded (or is about to be) but its body is broken: drop it.
            self._drop(bad)
        if not self.queue:
            self._refuse()

    def _drop(self, ex: Exchange) -> None:
        """Give up on the queued ``ex`` whose request will never be complete."""
        if self.queue[0] is not ex:
            self.queue.remove(ex)  # not started yet
            return
        self._disarm(ex)
        resp = ex.resp
        if resp is not None and resp.head_sent:
            self.refusal = b""  # a response is mid-way: nothing else can be said
            self.link.abort()
            return
        if resp is not None:
            resp.done = True  # closing its upstream link must not answer the client
        self.dispatcher.finish(ex, ex.link, reusable=False)
        ex.link = ex.resp = None
        self.queue.popleft()

    def _refuse(self) -> None:
        self.link.write(self.refusal)
        LingeringClose(self.link)
        self._release()

    def complete(self, ex: Exchange, link: Link | None, reusable: bool) -> None:
        """The response to ``ex`` has been fully written: move on to the next request."""
        if ex.timers is not None:
            self._disarm(ex)
        self.dispatcher.finish(ex, link, reusable and ex.req_done)
        # The response points at the exchange (resp.ex): a cycle that would keep both, this
        # server and its link until a full garbage collection.
        ex.link = ex.resp = None
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if not ex.req_done and not ex.upgrade and not ex.dropping:
            # Answered before the whole request came (an early 413, a failure): the client
            # may still be sending it, and closing with its bytes unread would reset the
            # connection under the answer.
            LingeringClose(self.link)
            self._release()
            return
        if ex.close_after or not ex.keep_alive or ex.upgrade or self.link.retired:
            self.link.close()
            return
        if self.piped and len(self.queue) <= MAX_PIPELINED // 2:
            self.piped = False
            self._resume_reading()
        if self.queue:
            if self.link.write_paused:
                # The client is not reading its answers: the next one waits (resume_writing),
                # or pipelined answers would pile up in its write buffer without end.
                return
            self._start(self.queue[0])
        elif self.refusal:
            self._refuse()
        elif self.link.eof:
            self.link.close()

    def _resume_reading(self) -> None:
        """Read the client again, unless something else still holds it: a body waiting for
        its upstream, too many requests waiting for answers, or an upgrade request (nothing
        after it is read until it is answered)."""
        if self.paused or self.piped:
            return
        queue = self.queue
        if queue and queue[-1].upgrade:
            return
        self.link.resume_reading()

    def switch(self, ex: Exchange, upstream: Link, tail: bytes) -> None:
        """101 Switching Protocols (or 2xx to a CONNECT): both sides become an opaque relay."""
        self.queue.clear()
        self._disarm(ex)  # an upgraded connection is no longer one request
        self.dispatcher.finish(ex, None, reusable=False)
        ex.resp = None
        self.link.resume_reading()
        Relay(self.link, upstream, early_a=ex.tunnel_tail, early_b=tail)
        self._release()


class LingeringClose:
    """After a refusal or an answer to an unfinished request: half-close, then read and drop
    what the client still sends (bounded in bytes and time) before closing. Closing at once
    with unread input would reset the connection, and a client still sending (a request head
    over the limit, an upload) would lose the answer it was sent."""

    __slots__ = ("left", "link", "timer")

    def __init__(self, link: Link, budget: int = 1 << 20, seconds: float = 2.0) -> None:
        self.link, self.left = link, budget
        if link.closed or link.eof:  # nothing more can come
            link.close()
            return
        link.sink = self
        link.write_eof()
        link.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(seconds, link.close)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.eof_received()

    def eof_received(self) -> None:
        self.timer.cancel()
        self.link.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.timer.cancel()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
