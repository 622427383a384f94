"""The upstream half of HTTP/1.1 forwarding: parse the upstream's response, relay it to the client.

A :class:`Response` is the sink of an upstream link while the link carries the answer to one
:class:`~proxy.http1_exchange.Exchange`. It writes the head (hop-by-hop headers dropped) and
the body as they arrive, one client write per upstream read; chunked bodies are re-chunked,
and transfer codings an HTTP/1.0 client cannot take are decoded. It hands the exchange back
to the client side (:class:`Client`, i.e. :class:`proxy.http1.Http1Server`) when the response
is complete, broken, or a ``101 Switching Protocols`` (or a 2xx answer to a CONNECT) turns both
links into a relay. More than :data:`~proxy.http1_exchange.MAX_HEADERS` header fields, or a
head over :data:`~proxy.http1_exchange.MAX_HEAD_BYTES`, make the response a 502.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from proxy.errors import ProxyError, UpstreamError
from proxy.http1_exchange import (
    HOP_BY_HOP,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    SPENT_PARSER,
    Dispatcher,
    Exchange,
    without_headers,
)
from proxy.link import Link
from proxy.transfer_coding import TransferDecoder, transfer_codings, undecodable

DECODE_STEP = 64 * 1024  # decoded body written per step, while the client keeps up

_STATUS_LINE = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}


class Client(Protocol):
    """What a response uses of the client side of its exchange (:class:`proxy.http1.Http1Server`)."""

    link: Link
    dispatcher: Dispatcher
    # Read for the time a response head arrived; it keeps the underscored name of the
    # server's slot.
    _loop: asyncio.AbstractEventLoop

    def switch(self, ex: Exchange, upstream: Link, tail: bytes) -> None:
        """101 Switching Protocols, or 2xx to a CONNECT: relay ``upstream`` and the client link
        opaquely, ``tail`` (what followed the answer's head) first."""

    def complete(self, ex: Exchange, link: Link | None, reusable: bool) -> None:
        """The response to ``ex`` has been fully written: move on to the next request."""

    def fail(self, ex: Exchange, error: ProxyError, link: Link | None = None) -> None:
        """Answer ``ex`` with the error's status (nothing of the response was written)."""

    def may_retry(self, ex: Exchange, status: int = 0) -> bool:
        """Whether ``ex``, answered ``status`` on this try, is to be sent again."""

    def retry(self, ex: Exchange, upstream: Link | None, status: int, why: str) -> None:
        """Give this try's answer (``status``) up and send ``ex`` again."""

    def resend(self, ex: Exchange, upstream: Link | None, why: str) -> bool:
        """A pooled ``upstream`` closed before any answer (``why``): send ``ex`` again on a new
        connection if it is idempotent and bodiless; whether it was."""


class _TunnelEstablished(Exception):
    """Raised through the parser after a 2xx answer to CONNECT, to stop it at the head."""


class _Retry(Exception):
    """Raised through the parser at the head of an answer the route retries: the client never
    sees it, and the link is not reused."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Stray(Exception):
    """Raised through the parser when the upstream sends more than the one response asked:
    a body after a head that has none, or another response. The client must never see it
    (it would take it for the answer to its next request), and the link is not reused."""


class Response:
    """The sink of an upstream link while it carries the response to one exchange.

    It stays with its link (``link.codec``) while the link is pooled, so that the next
    exchange on the link reuses it and its parser.
    """

    __slots__ = (
        "body_mode", "chunked", "decoder", "done", "ex", "has_length", "head", "head_at",
        "head_bytes", "head_sent", "out", "parser", "raw", "reason", "reusable", "reused",
        "server", "stray", "switching", "te", "tokens", "unaccounted", "upgrade_to",
    )  # fmt: skip

    server: Client
    ex: Exchange

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []  # what one read produced: written to the client in one go
        self.done = False

    def begin(self, server: Client, ex: Exchange, reused: bool = False) -> None:
        """Carry the response to ``ex`` (``reused``: on a link that carried one before)."""
        self.server = server
        self.ex = ex
        self.reused = reused
        self.head_sent = False
        self.done = False
        self.switching = False
        self.reusable = False
        self.stray = False  # bytes followed the complete response: the link is not reused
        self.body_mode = 0  # 0 raw (length or close-delimited), 1 re-chunk, 2 decode
        self.decoder: TransferDecoder | None = None  # body_mode 2: for an HTTP/1.0 client
        self.unaccounted = 0  # status of a head written but not yet reported to the dispatcher
        self.head_at = 0.0
        self.head_bytes = 0
        # For a CONNECT: the bytes received until its final head, to find where a tunnel starts.
        self.raw: bytes | None = b"" if ex.upgrade and ex.method == b"CONNECT" else None

    def data_received(self, data: bytes) -> None:
        if self.raw is not None and not self.head_sent:
            self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.switching:
                self._flush()
                if self.unaccounted:
                    self._account()
                self.server.switch(self.ex, self._link(), data[e.args[0] :])
                self.release()  # the links are a relay's now
                return
        except httptools.HttpParserError as e:
            self._flush()
            if isinstance(e.__context__, _Retry):
                self.done = True  # the link's close that follows must not answer the client
                status = e.__context__.status
                self.server.retry(self.ex, self._link(), status, f"answered {status}")
                return
            if self.unaccounted:
                self._account()
            if self.switching:  # a 2xx answer to CONNECT: the parser was stopped after its head
                self._tunnel()
                return
            if self.stray:  # the response was whole; what followed it goes with the link
                self.reusable = False
                self._finish()
                return
            self.done = True  # answered here: the link's close that follows must not answer again
            why = e.__context__ if isinstance(e.__context__, UpstreamError) else None
            self._broken(str(why or "the upstream sent a malformed HTTP response"))
            return
        self._flush()
        if self.unaccounted:
            self._account()
        if self.done:
            if self.decoder is not None:
                self.decode_more()
            else:
                self._finish()
        elif not self.head_sent:  # the head is still arriving
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.done = True
                self._broken(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes")

    def _account(self) -> None:
        # Metrics and balancer feedback run after the head is on its way to the client: they
        # are not on the latency path.
        status, self.unaccounted = self.unaccounted, 0
        self.server.dispatcher.response_head(self.ex, status, self.head_at)

    def on_message_begin(self) -> None:
        if self.done:  # a second response to one request: never the client's
            self.stray = True
            raise _Stray
        # The end-to-end headers as they will be written: name, b": ", value, b"\r\n".
        self.head: list[bytes] = []
        self.reason = b""
        self.chunked = False
        self.te = b""
        self.has_length = False
        self.head_bytes = 0
        self.tokens: tuple[bytes, ...] = ()
        self.upgrade_to = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                self.te = b"%b, %b" % (self.te, value.strip()) if self.te else value.strip()
                self.chunked = self.te.lower().endswith(b"chunked")
            elif lname == b"connection":
                self.tokens += tuple(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                self.upgrade_to = value
            return
        if lname == b"content-length":
            self.has_length = True
        self.head += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        if len(self.head) > 4 * MAX_HEADERS:  # raised through the parser: answered 502
            raise UpstreamError(
                f"the upstream's response has more than {MAX_HEADERS} header fields"
            )
        parser = self.parser
        status = parser.get_status_code()
        ex = self.ex
        parts = [_STATUS_LINE.get(status) or b"HTTP/1.1 %d " % status, self.reason, b"\r\n"]
        tokens = self.tokens
        # 101 to an Upgrade, or 2xx to a CONNECT (RFC 9110 9.3.6): HTTP ends on both links.
        self.switching = switching = ex.upgrade and (
            status == 101 or (200 <= status < 300 and ex.method == b"CONNECT")
        )
        if status == 101 and not switching:  # raised through the parser: answered 502
            raise UpstreamError("the upstream switched protocols on a request that offered none")
        if ex.replay is not None and status >= 200 and self.server.may_retry(ex, status):
            raise _Retry(status)  # the route retries this answer: the client does not see it
        tunnel = switching and status != 101  # a 2xx answer to CONNECT
        if tunnel:
            # A successful CONNECT answer has no content: framing headers in it are ignored.
            tokens += (b"content-length",)
        if tokens and not HOP_BY_HOP.issuperset(tokens):
            parts += without_headers(self.head, tokens)  # ``Connection`` names more headers to drop
        else:
            parts += self.head
        # Read here: httptools forgets keep-alive once the message is complete.
        self.reusable = parser.should_keep_alive()
        if 100 <= status < 200 and not switching:
            parts.append(b"\r\n")
            self.out.append(b"".join(parts))  # interim: the final one follows
            return
        no_body = ex.is_head or status in (204, 304) or switching
        if switching:
            if status == 101:
                parts += (b"connection: upgrade\r\nupgrade: ", self.upgrade_to, b"\r\n")
        elif self.chunked and not ex.client_10:
            parts += (b"transfer-encoding: ", self.te, b"\r\n")  # codings kept, chunks remade
            self.body_mode = 1
        elif not self.has_length and not no_body:
            ex.close_after = True  # close-delimited (or HTTP/1.0 client): EOF ends the body
            if ex.client_10:
                codings = transfer_codings(self.te)
                if codings:  # none may reach an HTTP/1.0 client: decode them here
                    problem = undecodable(codings)
                    if problem is not None:  # raised through the parser: answered 502
                        raise UpstreamError(f"the upstream used {problem}, which the proxy "
                                            f"cannot decode for an HTTP/1.0 client")  # fmt: skip
                    self.decoder = TransferDecoder(codings)
                    self.body_mode = 2
            elif self.te and not self.chunked:
                parts += (b"transfer-encoding: ", self.te, b"\r\n")  # e.g. gzip, to EOF
        if ex.close_after or not ex.keep_alive or self.server.link.retired:
            # Retired: the client's certificate expired (inbound); this answer is the last.
            parts.append(b"connection: close\r\n")
        elif ex.client_10:  # an HTTP/1.0 client keeps the connection only when told so
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.unaccounted = status
        self.head_at = self.server._loop.time()
        self.out.append(b"".join(parts))
        self.head_sent = True
        if tunnel:
            # llhttp would take what follows for a body: stop it here (see _tunnel).
            raise _TunnelEstablished
        if no_body and not switching:
            self.done = True

    def on_body(self, body: bytes) -> None:
        if self.done:  # a body after a head that has none (HEAD, 204, 304): never the client's
            self.stray = True
            raise _Stray
        if not self.body_mode:
            self.out.append(body)
        elif self.decoder is None:
            self.out.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.decoder.feed(body)
            self._decode()  # raises UpstreamError through the parser for a corrupt body

    def on_message_complete(self) -> None:
        if self.head_sent:
            if self.decoder is not None:
                self.decoder.end()
            elif self.body_mode:
                self.out.append(b"0\r\n\r\n")
            self.done = True

    def _decode(self) -> bool:
        """Write decoded body while the client takes it; True once all of it is written."""
        self._flush()
        decoder = self.decoder
        assert decoder is not None
        client = self.server.link
        while not client.write_paused and not client.closed:
            piece = decoder.read(DECODE_STEP)
            if not piece:
                return decoder.ended
            client.write(piece)
        return False  # the client's pause_writing paused the upstream too

    def decode_more(self) -> None:
        """Go on decoding (the client drained, or the coded body ended); finish when done."""
        try:
            drained = self._decode()
        except UpstreamError as e:
            self.done = True
            self._broken(str(e))
            return
        if drained and self.done:
            self.decoder = None
            self._finish()

    def _flush(self) -> None:
        # One write per upstream read: fewer syscalls and TLS records, and no head/body split
        # that would leave a small segment waiting on a delayed ACK.
        out = self.out
        if out:
            self.server.link.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _finish(self) -> None:
        ex = self.ex
        link = ex.link
        assert link is not None
        reusable = self.reusable and not ex.close_after
        if reusable and not ex.is_head:
            # After a HEAD answer the parser still expects the body the headers announce.
            link.codec = self
        self.server.complete(ex, link, reusable)

    def _tunnel(self) -> None:
        """The CONNECT was answered 2xx: relay what followed its final head, and the links."""
        raw = self.raw
        assert raw is not None
        # llhttp accepted every head (CRLF line ends, no folding) and 1xx heads have no body,
        # so each head ends at the first blank line after the previous one.
        start = 0
        while True:
            end = raw.index(b"\r\n\r\n", start) + 4
            if raw[start + 9 : start + 10] != b"1":  # the status of "HTTP/1.1 NNN"
                break
            start = end
        self.raw = None
        self.server.switch(self.ex, self._link(), raw[end:])
        self.release()  # the links are a relay's now

    def _link(self) -> Link:
        link = self.ex.link
        assert link is not None
        return link

    def _broken(self, reason: str) -> None:
        ex = self.ex
        # Nothing came back on a pooled link: its peer most likely closed it (an idle timeout)
        # as the request went out. An idempotent request is sent again.
        nothing_came = self.reused and not self.head_sent and not self.head_bytes
        if nothing_came and self.server.resend(ex, ex.link, reason):
            return
        if self.head_sent:
            ex.close_after = True
            self.server.dispatcher.finish(ex, ex.link, reusable=False)
            ex.link = None
            self.server.link.abort()  # the client must not take a truncated body as whole
        else:
            self.server.fail(ex, UpstreamError(reason), ex.link)

    def eof_received(self) -> None:
        if self.done:
            return
        if self.head_sent and self.ex.close_after and not self.chunked:
            self.done = True  # a close-delimited body ends here
            if self.decoder is not None:
                self.decoder.end()
                self.decode_more()
            else:
                self.server.complete(self.ex, self._link(), reusable=False)
        else:
            self.done = True
            self._broken("the upstream closed the connection before the response ended")

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self.done:  # a reset: whatever the framing, cut short
            self.done = True
            self._broken("the upstream reset the connection before the response ended")
        else:
            self.eof_received()
        self.release()

    def release(self) -> None:
        """The link has closed, or is a relay's now: break the cycle with the parser (see
        :class:`~proxy.http1_exchange.SpentParser`)."""
        self.parser = SPENT_PARSER

    def pause_writing(self) -> None:  # the upstream is slow to take the request body
        self.server.link.pause_reading()

    def resume_writing(self) -> None:
        self.server.link.resume_reading()
