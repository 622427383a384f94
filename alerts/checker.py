"""``trustmesh alerts check`` without Prometheus: the certificate rules over one scan.

The thresholds come from :mod:`alerts.thresholds` (kept equal to the PromQL by a test); labels
and annotations come from the rule files themselves, rendered as Prometheus renders them, so an
alert posted from cron is indistinguishable from one Prometheus would send (apart from the
``job``/``instance`` labels only a scrape adds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from alerts.errors import RuleFileError
from alerts.inventory import Inventory, SourceStatus
from alerts.rulebook import AlertRule
from alerts.thresholds import Firing, evaluate_all

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FIRING = 3


@dataclass(frozen=True, slots=True)
class Alert:
    """A firing alert with the labels and annotations Prometheus would give it."""

    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    value: float

    def __post_init__(self) -> None:
        if self.labels.get("alertname") != self.name:
            raise ValueError(f"alert {self.name!r} must carry alertname={self.name!r}")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")


def to_alert(firing: Firing, rules: Mapping[str, tuple[AlertRule, ...]]) -> Alert:
    """Dress a threshold crossing in its rule's labels and rendered annotations."""
    candidates = rules.get(firing.alertname, ())
    if len(candidates) != 1:
        raise RuleFileError(
            f"expected exactly one rule named {firing.alertname!r} in the rule files, "
            f"found {len(candidates)}"
        )
    (rule,) = candidates
    series = firing.cert.labels
    return Alert(
        name=rule.name,
        labels=rule.alert_labels(series),
        annotations=rule.alert_annotations(series, firing.value),
        value=firing.value,
    )


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The outcome of one check: firing alerts, unreadable sources and the exit code."""

    inventory: Inventory
    alerts: tuple[Alert, ...]

    @property
    def errors(self) -> tuple[SourceStatus, ...]:
        return self.inventory.errors

    @property
    def exit_code(self) -> int:
        """1 if a source could not be read (the answer is incomplete), else 3 if an alert
        fires, else 0."""
        if self.errors:
            return EXIT_ERROR
        return EXIT_FIRING if self.alerts else EXIT_OK


def check(
    inventory: Inventory, now: float, rules: Mapping[str, tuple[AlertRule, ...]]
) -> CheckReport:
    """Evaluate the certificate rules on ``inventory`` at ``now`` (epoch seconds)."""
    firings = evaluate_all(inventory.certs, now)
    return CheckReport(inventory, tuple(to_alert(f, rules) for f in firings))
