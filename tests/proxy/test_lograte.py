"""The rate-limited log of lines a peer can cause (one per refused connection)."""

from __future__ import annotations

import logging

import pytest

from proxy.lograte import PeerLog


def test_a_burst_then_a_line_that_says_how_many_were_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = PeerLog(logging.getLogger("test.peerlog"), burst=3, period=1.0, monotonic=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.peerlog"):
        for i in range(10):
            log.info("refusing connection %d", i)
        assert [r.getMessage() for r in caplog.records] == [
            "refusing connection 0",
            "refusing connection 1",
            "refusing connection 2",
        ]
        assert log.dropped == 7
        now[0] += 1.0  # the next window
        log.info("refusing connection %d", 10)
    assert caplog.records[-1].getMessage() == (
        "refusing connection 10 (7 more such lines not logged)"
    )
    assert log.dropped == 0


def test_nothing_is_counted_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    log = PeerLog(logging.getLogger("test.peerlog.quiet"), burst=1)
    with caplog.at_level(logging.WARNING, logger="test.peerlog.quiet"):
        for _ in range(5):
            log.info("refused")
    assert caplog.records == [] and log.dropped == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        PeerLog(logging.getLogger("x"), burst=0)
    with pytest.raises(ValueError, match="positive"):
        PeerLog(logging.getLogger("x"), period=0)
