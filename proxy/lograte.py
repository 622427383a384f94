"""Log lines that a peer can cause (a refused handshake, a denied connection), rate limited.

A client that hammers the inbound port with refused connections must not fill the disk with one
line each (``trustmesh up`` keeps its children's logs in files), nor hide that it happened: at
most ``burst`` lines get through per ``period`` seconds, and the next line that does says how
many were dropped. The identity service's refusal log works the same way (the package rules keep
the two apart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class PeerLog:
    """``info(...)`` as on a logger, at most ``burst`` lines per ``period`` seconds."""

    __slots__ = (
        "_burst",
        "_logged",
        "_logger",
        "_monotonic",
        "_period",
        "_window_start",
        "dropped",
    )

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 20,
        period: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst <= 0 or period <= 0:
            raise ValueError("log rate burst and period must be positive")
        self._logger = logger
        self._burst, self._period, self._monotonic = burst, period, monotonic
        self._window_start = -period
        self._logged = 0
        self.dropped = 0

    def info(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        now = self._monotonic()
        if now - self._window_start >= self._period:
            self._window_start, self._logged = now, 0
        if self._logged >= self._burst:
            self.dropped += 1
            return
        self._logged += 1
        if self.dropped:
            message += f" ({self.dropped} more such lines not logged)"
            self.dropped = 0
        self._logger.info(message, *args)
