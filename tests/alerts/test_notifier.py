from __future__ import annotations

from datetime import timedelta

import pytest
from alerts_testkit import Chain, Receiver

from alerts.checker import EXIT_ERROR, EXIT_FIRING, EXIT_OK, Alert, check
from alerts.errors import NotifyError, SourceError
from alerts.inventory import Reading, build_inventory
from alerts.notifier import (
    alertmanager_payload,
    notify_alertmanager,
    notify_webhook,
    rfc3339,
    webhook_payload,
)
from alerts.rulebook import load_rules

DAY = 86400.0


def _report(chain: Chain, now: float, *, broken: bool = False):  # type: ignore[no-untyped-def]
    results: list[tuple[str, Reading | Exception]] = [
        (
            "store:s",
            Reading(
                ((chain.anchor.certificate, "trust_anchor"), (chain.issuer.certificate, "issuer"))
            ),
        )
    ]
    if broken:
        results.append(("file:f", SourceError("gone")))
    return check(build_inventory(now, results), now, load_rules())


def test_check_exit_codes(chain: Chain) -> None:
    issued = chain.issuer.certificate.not_before.timestamp()
    assert _report(chain, issued + 3600).exit_code == EXIT_OK
    late = _report(chain, issued + 40 * 3600)  # 48h issuer, renewal window passed by a half
    assert late.exit_code == EXIT_FIRING
    assert [a.name for a in late.alerts] == ["IssuerExpiringSoon"]
    assert late.alerts[0].labels["severity"] == "warning"
    assert late.alerts[0].annotations["runbook_url"] == "runbooks/IssuerExpiringSoon.md"
    assert _report(chain, issued + 40 * 3600, broken=True).exit_code == EXIT_ERROR


def _alert() -> Alert:
    return Alert(
        "IssuerExpiringSoon",
        {"alertname": "IssuerExpiringSoon", "severity": "warning", "role": "issuer"},
        {"summary": "s", "runbook_url": "runbooks/IssuerExpiringSoon.md"},
        10.0,
    )


def test_payloads() -> None:
    now = 1_900_000_000.0
    (body,) = alertmanager_payload([_alert()], now, 3600)
    assert body["labels"]["alertname"] == "IssuerExpiringSoon"
    assert body["startsAt"] == rfc3339(now) == "2030-03-17T17:46:40Z"
    assert body["endsAt"] == rfc3339(now + 3600)
    hook = webhook_payload([_alert(), _alert()], now, 3600)
    assert hook["version"] == "4" and hook["status"] == "firing"
    assert hook["commonLabels"]["alertname"] == "IssuerExpiringSoon"
    assert hook["alerts"][0]["fingerprint"] == hook["alerts"][1]["fingerprint"]
    with pytest.raises(ValueError):
        alertmanager_payload([_alert()], now, 0)
    with pytest.raises(ValueError, match="alertname"):
        Alert("A", {"alertname": "B"}, {}, 0.0)


def test_notify_over_real_http() -> None:
    with Receiver() as receiver:
        notify_alertmanager(
            receiver.url + "/", [_alert()], 0.0, valid_for=timedelta(hours=1).total_seconds()
        )
        notify_webhook(receiver.url + "/hook", [_alert()], 0.0, valid_for=60)
    (path1, body1), (path2, body2) = receiver.received
    assert path1 == "/api/v2/alerts" and body1[0]["labels"]["severity"] == "warning"  # type: ignore[index]
    assert path2 == "/hook" and body2["alerts"][0]["status"] == "firing"  # type: ignore[index]


def test_notify_errors_are_named() -> None:
    with Receiver(status=400) as receiver, pytest.raises(NotifyError, match="HTTP 400: refused"):
        notify_webhook(receiver.url, [_alert()], 0.0, valid_for=60)
    with pytest.raises(NotifyError, match="cannot reach"):
        notify_webhook(receiver.url, [_alert()], 0.0, valid_for=60)  # closed now
    with pytest.raises(NotifyError, match="not an absolute http"):
        notify_webhook("ftp://x", [_alert()], 0.0, valid_for=60)
    with pytest.raises(NotifyError, match="must not carry a query"):
        notify_alertmanager("http://am/?q", [_alert()], 0.0, valid_for=60)
