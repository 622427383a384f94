"""Send firing alerts to Alertmanager's v2 API or to a webhook, as Prometheus would.

Alertmanager (``POST /api/v2/alerts``) gets a list of alerts, each with ``startsAt`` = now and
``endsAt`` = now + ``valid_for``: a cron job has no memory of what it sent, so an alert it stops
sending (the certificate was rotated) resolves by itself once ``valid_for`` passes. Choose
``valid_for`` longer than the cron period. A webhook gets Alertmanager's own webhook payload
(version 4), so receivers written for Alertmanager work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from alerts.checker import Alert
from alerts.errors import NotifyError

DEFAULT_TIMEOUT = 10.0
RECEIVER = "trustmesh-alerts-check"


def rfc3339(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).isoformat().replace("+00:00", "Z")


def _alert_body(alert: Alert, now: float, valid_for: float) -> dict[str, Any]:
    return {
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": rfc3339(now),
        "endsAt": rfc3339(now + valid_for),
        "generatorURL": "",
    }


def alertmanager_payload(
    alerts: Sequence[Alert], now: float, valid_for: float
) -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts``."""
    if valid_for <= 0:
        raise ValueError(f"valid_for must be positive, got {valid_for}")
    return [_alert_body(a, now, valid_for) for a in alerts]


def _fingerprint(labels: dict[str, str]) -> str:
    # Alertmanager's own fingerprint is an FNV hash of the sorted labels; receivers only use it
    # as an opaque identity, so a stable digest of the same input serves.
    canonical = json.dumps(sorted(labels.items())).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def webhook_payload(alerts: Sequence[Alert], now: float, valid_for: float) -> dict[str, Any]:
    """An Alertmanager-style webhook notification (version 4) for ``alerts``, all firing."""
    bodies = alertmanager_payload(alerts, now, valid_for)
    for body in bodies:
        body["status"] = "firing"
        body["fingerprint"] = _fingerprint(body["labels"])

    def common(key: str) -> dict[str, str]:
        if not bodies:
            return {}
        first = bodies[0][key]
        return {k: v for k, v in first.items() if all(b[key].get(k) == v for b in bodies)}

    return {
        "version": "4",
        "status": "firing",
        "receiver": RECEIVER,
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "groupLabels": {},
        "commonLabels": common("labels"),
        "commonAnnotations": common("annotations"),
        "externalURL": "",
        "alerts": bodies,
    }


def check_url(url: str, *, what: str, base: bool = False) -> str:
    """``url`` if it can be posted to, else :class:`NotifyError` naming ``what`` is wrong.

    Checked before anything is evaluated, so a cron job with a mistyped URL fails on its
    first run, not on the day an alert first fires. A ``base`` (Alertmanager's) gets a path
    appended, so it may carry no query or fragment.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyError(f"{what} URL {url!r} is not an absolute http(s) URL")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise NotifyError(f"{what} URL {url!r} contains whitespace or a control character")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        raise NotifyError(
            f"{what} URL {url!r} has a port that is not a number in 0..65535"
        ) from None
    if base and (parts.query or parts.fragment):
        raise NotifyError(
            f"{what} URL {url!r} must not carry a query or fragment: "
            "'/api/v2/alerts' is appended to it"
        )
    return url


def post_json(url: str, payload: Any, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """POST ``payload`` as JSON; raise :class:`NotifyError` unless the answer is 2xx."""
    check_url(url, what="notification")
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        detail = e.read(500).decode(errors="replace").strip()
        raise NotifyError(f"{url} answered HTTP {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NotifyError(f"cannot reach {url}: {reason}") from None


def notify_alertmanager(
    base_url: str,
    alerts: Sequence[Alert],
    now: float,
    *,
    valid_for: float,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Post ``alerts`` to the Alertmanager at ``base_url`` (e.g. ``http://127.0.0.1:9093``)."""
    check_url(base_url, what="Alertmanager", base=True)
    url = base_url.rstrip("/") + "/api/v2/alerts"
    post_json(url, alertmanager_payload(alerts, now, valid_for), timeout=timeout)


def notify_webhook(
    url: str,
    alerts: Sequence[Alert],
    now: float,
    *,
    valid_for: float,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Post ``alerts`` to a webhook in Alertmanager's webhook format."""
    post_json(url, webhook_payload(alerts, now, valid_for), timeout=timeout)
