"""alerts/thresholds.py against the promtool tests of certificates.yml.

promtool proves the expected alerts in alerts/rules/tests/certificates_test.yml against the
PromQL (test_rulebook.py runs it); this test proves the Python thresholds, labels and rendered
annotations against the very same expectations, so the two implementations cannot drift.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from alerts.checker import to_alert
from alerts.rulebook import RULES_DIR, load_rules
from alerts.thresholds import DAY, CertTimes, evaluate
from pki.durations import parse_duration

SERIES = re.compile(
    r"^trustmesh_cert_(not_before|not_after|renewal_due)_timestamp_seconds\{(.*)\}$"
)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def _certs(input_series: list[dict[str, Any]]) -> list[CertTimes]:
    found: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    for entry in input_series:
        match = SERIES.match(entry["series"])
        if not match:
            continue
        labels = tuple(sorted(LABEL.findall(match.group(2))))
        value = float(str(entry["values"]).split("x")[0])  # constant series: 'Nx10'
        found.setdefault(labels, {})[match.group(1)] = value
    certs = []
    for labels, times in found.items():
        if len(times) == 3 and "job" not in dict(labels):
            certs.append(CertTimes(**dict(labels), **times))
    return certs


def _cases() -> list[tuple[str, list[CertTimes], dict[str, Any]]]:
    document = yaml.safe_load((RULES_DIR / "tests" / "certificates_test.yml").read_text())
    cases = []
    for group in document["tests"]:
        certs = _certs(group["input_series"])
        for case in group.get("alert_rule_test", []):
            cases.append((group["name"], certs, case))
    return cases


CASES = _cases()


@pytest.mark.parametrize(
    ("group", "certs", "case"),
    CASES,
    ids=[f"{g}@{c['eval_time']}:{c['alertname']}" for g, _, c in CASES],
)
def test_python_thresholds_match_the_promtool_expectations(
    group: str, certs: list[CertTimes], case: dict[str, Any]
) -> None:
    rules = load_rules()
    now = parse_duration(case["eval_time"]).total_seconds()
    got = sorted(
        (sorted(a.labels.items()), sorted(a.annotations.items()))
        for cert in certs
        for f in evaluate(cert, now)
        if f.alertname == case["alertname"]
        for a in [to_alert(f, rules)]
    )
    expected = sorted(
        (
            sorted({**e["exp_labels"], "alertname": case["alertname"]}.items()),
            sorted(e["exp_annotations"].items()),
        )
        for e in case["exp_alerts"] or []
        if "fingerprint" in e["exp_labels"]  # Linkerd proxies' series exist only in Prometheus
    )
    assert got == expected


def test_cases_cover_every_certificate_alert() -> None:
    assert len(CASES) >= 30
    names = {case["alertname"] for _, _, case in CASES}
    assert {"IssuerExpiringSoon", "IssuerExpiryCritical", "WorkloadCertExpired"} <= names


def _issuer(not_before: float, lifetime: float) -> CertTimes:
    return CertTimes(
        "issuer", "CN=i", "f", "s", not_before, not_before + lifetime, not_before + lifetime * 2 / 3
    )


@given(st.floats(min_value=0, max_value=36 * 3600))
def test_a_48h_issuer_is_quiet_until_a_quarter_of_its_renewal_window_passed(age: float) -> None:
    # renewal due at 32h, window 16h: quiet up to 36h of age
    assert evaluate(_issuer(1e9, 48 * 3600), 1e9 + age) == ()


def test_a_48h_issuer_escalates_when_not_renewed() -> None:
    cert = _issuer(0, 48 * 3600)
    assert [f.alertname for f in evaluate(cert, 36 * 3600 + 1)] == ["IssuerExpiringSoon"]
    assert [f.alertname for f in evaluate(cert, 44 * 3600 + 1)] == [
        "IssuerExpiringSoon",
        "IssuerExpiryCritical",
    ]
    fired = evaluate(cert, 49 * 3600)
    assert fired[0].value == pytest.approx(-3600)


def test_a_year_long_issuer_uses_days() -> None:
    cert = _issuer(0, 365 * DAY)
    assert evaluate(cert, 335 * DAY - 1) == ()
    assert [f.alertname for f in evaluate(cert, 335 * DAY + 1)] == ["IssuerExpiringSoon"]
    assert len(evaluate(cert, 358 * DAY + 1)) == 2


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"role": "root"}, "role must be one of"),
        ({"not_after": 0.0, "not_before": 10.0}, "before not_before"),
        ({"fingerprint": ""}, "must not be empty"),
        ({"renewal_due": float("nan")}, "finite"),
    ],
)
def test_cert_times_refuse_bad_values(kwargs: dict[str, Any], error: str) -> None:
    base: dict[str, Any] = dict(
        role="issuer",
        subject="CN=i",
        fingerprint="f",
        source="s",
        not_before=0.0,
        not_after=10.0,
        renewal_due=5.0,
    )
    with pytest.raises(ValueError, match=error):
        CertTimes(**{**base, **kwargs})


def test_cert_times_refuse_wrong_types() -> None:
    with pytest.raises(TypeError):
        CertTimes("issuer", "CN=i", "f", "s", "0", 10.0, 5.0)  # type: ignore[arg-type]
