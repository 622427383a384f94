"""Parsing and formatting of human durations: ``90s``, ``15m``, ``24h``, ``30d``, ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

from pki.errors import InvalidDuration

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``24h``, ``30d``, ``1h30m`` (or a bare number of seconds) into a timedelta."""
    if not isinstance(text, str):
        raise TypeError(f"duration must be a string, not {type(text).__name__}")
    s = text.strip().lower()
    if not s:
        raise InvalidDuration("duration is empty; expected e.g. 90s, 24h or 30d")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return _seconds(float(s), text)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise InvalidDuration(
            f"invalid duration {text!r}: use a number with a unit s, m, h, d or w (e.g. 90s, 24h, 30d)"
        )
    return _seconds(total, text)


def _seconds(total: float, text: str) -> timedelta:
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise InvalidDuration(f"duration {text!r} is too large") from None


def format_duration(delta: timedelta) -> str:
    """Render a timedelta compactly: ``29d 23h``, ``4h 10m``, ``59s``, ``-2h 5m`` when negative."""
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    if minutes:
        return f"{sign}{minutes}m {secs}s"
    return f"{sign}{secs}s"
