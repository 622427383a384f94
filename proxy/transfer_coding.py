"""Decoding transfer codings (gzip, deflate) for a client that may not be sent them.

Transfer codings are hop-by-hop (RFC 9112 section 6.1) and an HTTP/1.0 client may be sent
no ``Transfer-Encoding`` at all, so a response the upstream framed as ``gzip, chunked`` is
de-chunked by the parser and decoded here before it reaches such a client. Without I/O and
incremental: coded bytes go in with :meth:`TransferDecoder.feed`, decoded bytes come out of
:meth:`TransferDecoder.read` at most ``limit`` at a time, so that the driver decodes only as
fast as the client takes the result (a small gzip body can expand a thousandfold).
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Sequence

from proxy.errors import UpstreamError

_GZIP_WBITS = 16 + zlib.MAX_WBITS
# RFC 9110 8.4.1: "deflate" is the zlib format; "x-gzip" is gzip.
_WBITS = {b"gzip": _GZIP_WBITS, b"x-gzip": _GZIP_WBITS, b"deflate": zlib.MAX_WBITS}
MAX_CODINGS = 4  # each is a decompressor held per response: a header may not ask for more
_STEP = 64 * 1024  # how much one stage asks of the stage before it


def transfer_codings(te: bytes) -> tuple[bytes, ...]:
    """The codings of a Transfer-Encoding value, in the order applied, without a final
    ``chunked`` (the HTTP parser removes that framing)."""
    codings = tuple(c for c in (c.strip().lower() for c in te.split(b",")) if c)
    return codings[:-1] if codings[-1:] == (b"chunked",) else codings


def undecodable(codings: Sequence[bytes]) -> str | None:
    """Why :class:`TransferDecoder` cannot decode ``codings``, or None when it can."""
    if len(codings) > MAX_CODINGS:
        return f"{len(codings)} transfer codings (at most {MAX_CODINGS} are decoded)"
    for coding in codings:
        if coding not in _WBITS:
            return f"transfer coding {coding.decode('latin-1')!r}"
    return None


class _Stage:
    __slots__ = ("coding", "decompressor", "seen", "tail")

    def __init__(self, coding: bytes) -> None:
        self.coding = coding
        self.decompressor = zlib.decompressobj(_WBITS[coding])
        self.tail = b""  # input given to this stage and not consumed yet
        self.seen = False

    def name(self) -> str:
        return self.coding.decode("latin-1")


class TransferDecoder:
    """Undoes ``codings`` (as listed in Transfer-Encoding: first applied first)."""

    __slots__ = ("_input", "_stages", "ended")

    def __init__(self, codings: Sequence[bytes]) -> None:
        problem = undecodable(codings) if codings else "no transfer coding"
        if problem is not None:
            raise ValueError(f"cannot decode {problem}")
        self._stages = [_Stage(c) for c in reversed(codings)]  # the last applied is undone first
        self._input: deque[bytes] = deque()
        self.ended = False

    def feed(self, data: bytes) -> None:
        """More coded bytes (the de-chunked body) arrived."""
        if data:
            self._input.append(data)

    def end(self) -> None:
        """The coded body is complete."""
        self.ended = True

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) decoded bytes; ``b""`` when more input is needed, or once
        everything is decoded after :meth:`end`. Raises UpstreamError for a corrupt body or,
        after :meth:`end`, a truncated one."""
        out = self._pull(len(self._stages) - 1, limit)
        if not out and self.ended and not self._input:
            for stage in self._stages:
                if stage.seen and not stage.decompressor.eof:
                    raise UpstreamError(f"the upstream's {stage.name()} body is truncated")
        return out

    def _pull(self, index: int, limit: int) -> bytes:
        stage = self._stages[index]
        while True:
            d = stage.decompressor
            try:
                out = d.decompress(stage.tail, limit)
            except zlib.error as e:
                raise UpstreamError(f"the upstream's {stage.name()} body is corrupt: {e}") from None
            stage.tail = d.unconsumed_tail
            if d.eof and d.unused_data:  # (unconsumed_tail may hold a copy of it)
                if _WBITS[stage.coding] != _GZIP_WBITS:
                    raise UpstreamError(
                        f"data follows the end of the upstream's {stage.name()} body"
                    )
                # gzip bodies may be several members, one after another (RFC 1952 2.2).
                stage.tail = d.unused_data
                stage.decompressor = zlib.decompressobj(_GZIP_WBITS)
            if out:
                return out
            if stage.tail:
                continue
            if index == 0:
                more = self._input.popleft() if self._input else b""
            else:
                more = self._pull(index - 1, _STEP)
            if not more:
                return b""
            stage.tail = more
            stage.seen = True
