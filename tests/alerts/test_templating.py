from __future__ import annotations

import pytest

from alerts.errors import TemplateError
from alerts.templating import (
    check_template,
    humanize,
    humanize_duration,
    humanize_percentage,
    render,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (2591700, "29d 23h 55m 0s"),
        (86400, "1d 0h 0m 0s"),
        (3 * 3600 + 5, "3h 0m 5s"),
        (61.9, "1m 1s"),
        (1.5, "1.5s"),
        (-300, "-5m 0s"),
        (0.25, "250ms"),
    ],
)
def test_humanize_duration(seconds: float, text: str) -> None:
    assert humanize_duration(seconds) == text


def test_humanize_and_percentage() -> None:
    assert humanize_percentage(10 / 110) == "9.091%"
    assert humanize(1 / 60) == "16.67m"
    assert humanize(1234567) == "1.235M"
    assert humanize(0) == "0"


def test_render_labels_and_value() -> None:
    text = render(
        "{{ $labels.a }} has {{ $value | humanizeDuration }} {{ $labels.missing }}.", {"a": "x"}, 90
    )
    assert text == "x has 1m 30s ."


@pytest.mark.parametrize(
    "template",
    [
        "{{ $value }}",
        "{{ $value | title }}",
        "{{ range $labels }}",
        "{{ $labels.a",
        "{{ .Labels.a }}",
    ],
)
def test_unsupported_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        check_template(template)
