"""Durations: 90s, 24h, 30d, compound forms; only InvalidDuration on garbage."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pki.durations import format_duration, parse_duration
from pki.errors import InvalidDuration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("24h", timedelta(hours=24)),
        ("30d", timedelta(days=30)),
        ("1h30m", timedelta(minutes=90)),
        ("2w", timedelta(days=14)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        (" 45 ", timedelta(seconds=45)),
        ("48H", timedelta(hours=48)),
    ],
)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "1y", "1h 30m", "-5s", "5 s", "1h30", "s5"])
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidDuration):
        parse_duration(text)


@given(st.text(max_size=30))
def test_garbage_only_raises_invalid_duration(text: str) -> None:
    try:
        parse_duration(text)
    except InvalidDuration:
        pass


@given(st.integers(0, 10**6), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_compound_round_trip(d: int, h: int, m: int, s: int) -> None:
    expected = timedelta(days=d, hours=h, minutes=m, seconds=s)
    assert parse_duration(f"{d}d{h}h{m}m{s}s") == expected


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(days=29, hours=23, minutes=5), "29d 23h"),
        (timedelta(hours=4, minutes=10), "4h 10m"),
        (timedelta(minutes=2, seconds=3), "2m 3s"),
        (timedelta(seconds=59), "59s"),
        (-timedelta(hours=2, minutes=5), "-2h 5m"),
    ],
)
def test_format(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


def test_type_error() -> None:
    with pytest.raises(TypeError):
        parse_duration(90)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["86400000000000", "99999999999999d", "1" + "0" * 400 + "s"])
def test_too_large(text: str) -> None:
    with pytest.raises(InvalidDuration, match="too large"):
        parse_duration(text)
