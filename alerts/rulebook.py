"""The alert rules as data: load ``alerts/rules/*.yml`` and check what every alert must carry.

Prometheus evaluates the expressions; TrustMesh itself reads the rules for their labels and
annotations (so ``trustmesh alerts check`` notifies with exactly what Prometheus would send) and
to verify the contract every alert must meet: a ``severity`` label, ``summary``,
``description`` and a ``runbook_url`` ending in ``runbooks/<AlertName>.md``.

The shipped files link runbooks by their path in the repository (``runbooks/<AlertName>.md``);
:func:`link_runbooks` and :func:`write_rules` turn those into absolute URLs under a base the
operator gives (where the runbooks are published), so that a page links somewhere clickable.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from alerts.errors import RuleFileError, TemplateError
from alerts.templating import check_template, render
from pki.store import write_file_atomic

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


def runbook_base_url(url: str) -> str:
    """``url`` checked as a base for runbook links, without its trailing slash.

    It must be an absolute http(s) URL without query, fragment, whitespace or quotes (the
    links are ``<base>/runbooks/<AlertName>.md``), e.g.
    ``https://git.example.com/platform/trustmesh/-/blob/main``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RuleFileError(
            f"runbook base URL {url!r} is not an absolute http(s) URL "
            "(e.g. https://git.example.com/platform/trustmesh/-/blob/main)."
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise RuleFileError(
            f"runbook base URL {url!r} must not carry a query or fragment: "
            "'/runbooks/<AlertName>.md' is appended to it."
        )
    if any(c.isspace() or c in "\"'\\" or ord(c) < 0x20 for c in url):
        raise RuleFileError(
            f"runbook base URL {url!r} contains whitespace, a quote or a backslash."
        )
    return url.rstrip("/")


_RUNBOOK_LINE = re.compile(
    r"^(?P<lead>[ \t]*runbook_url:[ \t]*)(?P<q>[\"']?)[^\s\"']*?runbooks/(?P<name>\w+)\.md(?P=q)[ \t]*$",
    re.MULTILINE,
)


def _link(text: str, base: str) -> str:
    """``text`` with each one-line ``runbook_url`` pointing under ``base`` (already checked)."""
    return _RUNBOOK_LINE.sub(lambda m: f'{m["lead"]}"{base}/runbooks/{m["name"]}.md"', text)


def _parse(text: str, file: str, base: str | None = None) -> list[AlertRule]:
    """The alerting rules of one rule file; with ``base``, each must link its runbook there."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RuleFileError(f"{file}: cannot be read as YAML: {e}") from e
    rules = list(_rules_of(document, file))
    for rule in rules if base is not None else ():
        want = f"{base}/runbooks/{rule.name}.md"
        if rule.annotations["runbook_url"] != want:
            raise RuleFileError(
                f"{file}: alert {rule.name!r}: runbook_url "
                f"{rule.annotations['runbook_url']!r} could not be rewritten to {want!r}; "
                f"write it on one line as 'runbook_url: runbooks/{rule.name}.md'."
            )
    return rules


def link_runbooks(text: str, base_url: str, file: str = "<memory>") -> str:
    """The rule file ``text`` with every alert's ``runbook_url`` set to
    ``<base_url>/runbooks/<AlertName>.md``; everything else (comments, expressions, layout) is
    kept byte for byte. Raises :class:`RuleFileError` when an alert's link is not written on
    one line as ``runbook_url: .../runbooks/<AlertName>.md`` and so could not be rewritten."""
    base = runbook_base_url(base_url)
    out = _link(text, base)
    _parse(out, file, base)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleFileError(f"{path}: cannot be read: {e}") from e


def _load(directory: Path, runbook_base: str | None) -> list[tuple[Path, str, list[AlertRule]]]:
    """Each rule file under ``directory`` (``*.yml``, sorted): its path, its text (runbook
    links made absolute with ``runbook_base``) and its alerting rules, each file parsed once."""
    base = runbook_base_url(runbook_base) if runbook_base is not None else None
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise RuleFileError(f"no rule files (*.yml) in {directory}.")
    loaded = []
    for path in files:
        text = _read(path) if base is None else _link(_read(path), base)
        loaded.append((path, text, _parse(text, str(path), base)))
    return loaded


def load_rules(
    directory: Path = RULES_DIR, *, runbook_base: str | None = None
) -> dict[str, tuple[AlertRule, ...]]:
    """All alerting rules under ``directory`` (``*.yml``), by alert name, in file order; with
    ``runbook_base``, their runbook links made absolute (:func:`link_runbooks`)."""
    by_name: dict[str, list[AlertRule]] = {}
    for _, _, rules in _load(directory, runbook_base):
        for rule in rules:
            by_name.setdefault(rule.name, []).append(rule)
    return {name: tuple(rules) for name, rules in by_name.items()}


def write_rules(
    output: Path, *, directory: Path = RULES_DIR, runbook_base: str | None = None
) -> list[Path]:
    """Write the rule files of ``directory`` into ``output`` (created if missing) for Prometheus
    to load, runbook links made absolute with ``runbook_base``; return the files written.

    Every file is rendered and checked before the first one is written, and each is replaced
    atomically, so a refusal leaves ``output`` as it was and Prometheus never reads half a file.
    """
    if output.resolve() == directory.resolve():
        raise RuleFileError(f"{output} is the source directory; choose another output directory.")
    rendered = [(output / path.name, text) for path, text, _ in _load(directory, runbook_base)]
    try:
        output.mkdir(parents=True, exist_ok=True)
        for target, text in rendered:
            write_file_atomic(target, text.encode("utf-8"))
    except OSError as e:
        raise RuleFileError(f"cannot write the rule files into {output}: {e}") from e
    return [target for target, _ in rendered]
