"""The alert rules as data: load ``alerts/rules/*.yml`` and check what every alert must carry.

Prometheus evaluates the expressions; TrustMesh itself reads the rules for their labels and
annotations (so ``trustmesh alerts check`` notifies with exactly what Prometheus would send) and
to verify the contract every alert must meet: a ``severity`` label, ``summary``,
``description`` and a ``runbook_url`` ending in ``runbooks/<AlertName>.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from alerts.errors import RuleFileError, TemplateError
from alerts.templating import check_template, render

RULES_DIR = Path(__file__).resolve().parent / "rules"
SEVERITIES = ("warning", "critical")
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook_url")


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One alerting rule as written in a rule file (several rules may share one name)."""

    name: str
    expr: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    for_: str = "0s"
    file: str = ""

    def __post_init__(self) -> None:
        where = f"alert {self.name!r} in {self.file or '<memory>'}"
        if not self.name or not self.name.isidentifier():
            raise RuleFileError(f"{where}: the alert name must be a non-empty identifier.")
        if self.labels.get("severity") not in SEVERITIES:
            raise RuleFileError(f"{where}: label 'severity' must be one of {SEVERITIES}.")
        for key in REQUIRED_ANNOTATIONS:
            if not self.annotations.get(key, "").strip():
                raise RuleFileError(f"{where}: annotation {key!r} is missing or empty.")
        if not self.annotations["runbook_url"].endswith(f"runbooks/{self.name}.md"):
            raise RuleFileError(f"{where}: runbook_url must end in 'runbooks/{self.name}.md'.")
        for key, text in self.annotations.items():
            try:
                check_template(text)
            except TemplateError as e:
                raise RuleFileError(f"{where}: annotation {key!r}: {e}") from None
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def severity(self) -> str:
        return self.labels["severity"]

    @property
    def runbook(self) -> str:
        """The runbook path relative to the repository root, e.g. ``runbooks/ExporterDown.md``."""
        return f"runbooks/{self.name}.md"

    def alert_labels(self, series_labels: Mapping[str, str]) -> dict[str, str]:
        """Labels of the alert Prometheus would raise for a series with ``series_labels``."""
        return {**series_labels, **self.labels, "alertname": self.name}

    def alert_annotations(self, series_labels: Mapping[str, str], value: float) -> dict[str, str]:
        """Annotations rendered as Prometheus renders them for that series and value."""
        return {k: render(v, series_labels, value) for k, v in self.annotations.items()}


def _rules_of(document: Any, file: str) -> Iterable[AlertRule]:
    if not isinstance(document, dict) or not isinstance(document.get("groups"), list):
        raise RuleFileError(f"{file}: expected a mapping with a 'groups' list.")
    for group in document["groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("rules"), list):
            raise RuleFileError(f"{file}: every group needs a 'rules' list.")
        for rule in group["rules"]:
            if not isinstance(rule, dict):
                raise RuleFileError(f"{file}: a rule is not a mapping.")
            if "alert" not in rule:
                continue  # a recording rule
            yield AlertRule(
                name=str(rule["alert"]),
                expr=str(rule.get("expr", "")),
                labels={str(k): str(v) for k, v in (rule.get("labels") or {}).items()},
                annotations={str(k): str(v) for k, v in (rule.get("annotations") or {}).items()},
                for_=str(rule.get("for", "0s")),
                file=file,
            )


def load_rules(directory: Path = RULES_DIR) -> dict[str, tuple[AlertRule, ...]]:
    """All alerting rules under ``directory`` (``*.yml``), by alert name, in file order."""
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise RuleFileError(f"no rule files (*.yml) in {directory}.")
    by_name: dict[str, list[AlertRule]] = {}
    for path in files:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise RuleFileError(f"{path}: cannot be read as YAML: {e}") from e
        for rule in _rules_of(document, str(path)):
            by_name.setdefault(rule.name, []).append(rule)
    return {name: tuple(rules) for name, rules in by_name.items()}
