"""Opaque relaying between two links, with half-close.

Bytes from one side are written to the other as they arrive. An EOF from one side becomes a
write-EOF (a TLS close_notify over mesh TLS) on the other, while the other direction keeps
flowing; the pair closes once both directions ended or either side failed. Back-pressure:
when one side's write buffer fills, the other side stops reading until it drains.
"""

from __future__ import annotations

from proxy.link import Link


class _Direction:
    """Moves bytes from ``src`` to ``dst``; installed as ``src``'s sink."""

    __slots__ = ("dst", "ended", "relay", "src")

    def __init__(self, relay: Relay, src: Link, dst: Link) -> None:
        self.relay, self.src, self.dst = relay, src, dst
        self.ended = False

    def data_received(self, data: bytes) -> None:
        self.dst.write(data)

    def eof_received(self) -> None:
        self.ended = True
        self.dst.write_eof()
        self.relay.check_done()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.ended = True
        self.relay.close()

    def pause_writing(self) -> None:  # src's buffer is full: stop reading what feeds it
        self.dst.pause_reading()

    def resume_writing(self) -> None:
        self.dst.resume_reading()


class Relay:
    """Relays ``a`` <-> ``b`` until both directions end; ``early_*`` are bytes already read."""

    __slots__ = ("_ab", "_ba", "a", "b", "done")

    def __init__(self, a: Link, b: Link, *, early_a: bytes = b"", early_b: bytes = b"") -> None:
        self.a, self.b = a, b
        self.done = False
        self._ab = _Direction(self, a, b)
        self._ba = _Direction(self, b, a)
        a.sink, b.sink = self._ab, self._ba
        if early_a:
            b.write(early_a)
        if early_b:
            a.write(early_b)
        # Links that ended before the relay took over still need their EOF passed on.
        for link, direction in ((a, self._ab), (b, self._ba)):
            if link.closed:
                direction.connection_lost(None)
            elif link.eof:
                direction.eof_received()

    def check_done(self) -> None:
        if not self.done and self._ab.ended and self._ba.ended:
            self.close()

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        # The directions point back at the relay: dropped, there is no cycle left, and the
        # links' release on close frees the relay and both directions at once.
        del self._ab, self._ba
        self.a.close()
        self.b.close()
