"""Render the Prometheus annotation templates used in ``alerts/rules/*.yml`` without Prometheus.

``trustmesh alerts check`` posts alerts with the same annotations Prometheus would produce, so
it renders the rules' own templates. Only the subset the rules use is supported:
``{{ $labels.NAME }}`` and ``{{ $value | F }}`` with F one of
``humanizeDuration``, ``humanizePercentage``, ``humanize``. Anything else raises
:class:`TemplateError` (a test renders every rule's annotations, so a rule using more fails
there rather than at 3 a.m.). The formatting follows Prometheus' documented output, e.g.
``humanizeDuration(2591700) == "29d 23h 55m 0s"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

from alerts.errors import TemplateError

_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
_LABEL = re.compile(r"^\$labels\.([A-Za-z_][A-Za-z0-9_]*)$")
_VALUE = re.compile(r"^\$value\s*\|\s*([A-Za-z]+)$")


def _go_g4(value: float) -> str:
    """Go's ``%.4g``: like Python's, but Go writes the exponent with at least two digits too."""
    return f"{value:.4g}"


def humanize_duration(value: float) -> str:
    """Seconds as ``1d 2h 3m 4s`` (days/hours/minutes shown from the largest non-zero unit)."""
    if math.isnan(value) or math.isinf(value):
        return _go_g4(value)
    if value == 0:
        return "0s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        total = int(abs(value))
        seconds, minutes = total % 60, (total // 60) % 60
        hours, days = (total // 3600) % 24, total // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_go_g4(abs(value))}s"
    value, prefix = _small_prefix(value)
    return f"{_go_g4(value)}{prefix}s"


def _small_prefix(value: float) -> tuple[float, str]:
    """Scale ``0 < |value| < 1`` up by thousands: ``0.0025 -> (2.5, "m")``."""
    prefix = ""
    for unit in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = unit
        value *= 1000
    return value, prefix


def humanize_percentage(value: float) -> str:
    """A ratio as a percentage with four significant digits: ``0.25 -> "25%"``."""
    return f"{_go_g4(value * 100)}%"


def humanize(value: float) -> str:
    """A number with a metric prefix (k, M, G, ... or m, u, n, ...), four significant digits."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return _go_g4(value)
    if abs(value) >= 1:
        prefix = ""
        for unit in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix = unit
            value /= 1000
        return f"{_go_g4(value)}{prefix}"
    value, prefix = _small_prefix(value)
    return f"{_go_g4(value)}{prefix}"


FUNCTIONS: Mapping[str, Callable[[float], str]] = {
    "humanizeDuration": humanize_duration,
    "humanizePercentage": humanize_percentage,
    "humanize": humanize,
}


def check_template(template: str) -> None:
    """Raise :class:`TemplateError` if ``template`` uses anything this renderer cannot render."""
    render(template, {}, 0.0)


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Render ``template`` for an alert with ``labels`` and ``value``; missing labels render as
    the empty string, as in Prometheus."""

    def action(match: re.Match[str]) -> str:
        body = match.group(1)
        if label := _LABEL.match(body):
            return labels.get(label.group(1), "")
        if val := _VALUE.match(body):
            function = val.group(1)
            if function not in FUNCTIONS:
                raise TemplateError(f"template function {function!r} is not supported")
            return FUNCTIONS[function](value)
        raise TemplateError(f"template action {{{{ {body} }}}} is not supported")

    if "{{" in _ACTION.sub("", template):
        raise TemplateError(f"unbalanced template braces in {template!r}")
    return _ACTION.sub(action, template)
