from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from alerts.errors import RuleFileError
from alerts.rulebook import RULES_DIR, AlertRule, load_rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed"
)

REQUIRED = {
    "TrustAnchorExpiringSoon",
    "TrustAnchorExpiryCritical",
    "IssuerExpiringSoon",
    "IssuerExpiryCritical",
    "IssuerRefused",
    "WorkloadCertRenewalOverdue",
    "WorkloadCertExpired",
    "IdentityIssuanceErrors",
    "ProxyInjectorUnhealthy",
    "WebhookCallsFailing",
    "ControlPlaneNotReady",
    "ProxyTrustBundleStale",
    "ExporterDown",
}


def test_every_required_alert_exists_with_its_contract() -> None:
    rules = load_rules()
    assert set(rules) >= REQUIRED
    for name, variants in rules.items():
        for rule in variants:
            assert rule.annotations["runbook_url"].endswith(f"runbooks/{name}.md")
            assert rule.severity in ("warning", "critical")


def test_every_alert_has_promtool_tests_that_fire_and_do_not_fire() -> None:
    fired: dict[str, bool] = {}
    silent: dict[str, bool] = {}
    for path in (RULES_DIR / "tests").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                name = case["alertname"]
                if case.get("exp_alerts"):
                    fired[name] = True
                else:
                    silent[name] = True
    for name in load_rules():
        assert fired.get(name), f"no promtool test where {name} fires"
        assert silent.get(name), f"no promtool test where {name} does not fire"


@needs_promtool
def test_promtool_check_and_test_rules() -> None:
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", *files], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted(str(p.relative_to(RULES_DIR)) for p in (RULES_DIR / "tests").glob("*.yml"))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", *tests],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_catches_a_moved_threshold(tmp_path: Path) -> None:
    """The promtool tests are sharp: a 29-day warning threshold makes them fail."""
    shutil.copytree(RULES_DIR, tmp_path / "rules")
    rules = tmp_path / "rules" / "certificates.yml"
    rules.write_text(rules.read_text().replace("< 30 * 86400", "< 29 * 86400"))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "tests/certificates_test.yml"],
        cwd=tmp_path / "rules",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "IssuerExpiringSoon" in run.stdout + run.stderr


def _write(tmp_path: Path, rule: dict[str, object]) -> Path:
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    return tmp_path


GOOD = {
    "alert": "Foo",
    "expr": "up == 0",
    "labels": {"severity": "warning"},
    "annotations": {"summary": "s", "description": "d", "runbook_url": "runbooks/Foo.md"},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": {}}, "severity"),
        ({"labels": {"severity": "page"}}, "severity"),
        ({"annotations": {**GOOD["annotations"], "summary": ""}}, "summary"),  # type: ignore[dict-item]
        ({"annotations": {**GOOD["annotations"], "runbook_url": "runbooks/Bar.md"}}, "runbook_url"),  # type: ignore[dict-item]
        (
            {"annotations": {**GOOD["annotations"], "description": "{{ $value | printf }}"}},
            "printf",
        ),  # type: ignore[dict-item]
    ],
)
def test_rule_contract_violations_are_named(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    with pytest.raises(RuleFileError, match=message):
        load_rules(_write(tmp_path, {**GOOD, **change}))


def test_load_rules_errors(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="no rule files"):
        load_rules(tmp_path)
    (tmp_path / "bad.yml").write_text("groups: [")
    with pytest.raises(RuleFileError, match="YAML"):
        load_rules(tmp_path)
    (tmp_path / "bad.yml").write_text("rules: []")
    with pytest.raises(RuleFileError, match="groups"):
        load_rules(tmp_path)


def test_alert_rule_renders_like_prometheus() -> None:
    rule = AlertRule(
        "Foo",
        "up",
        {"severity": "critical"},
        {**GOOD["annotations"], "description": "{{ $labels.x }} {{ $value | humanizeDuration }}"},
    )  # type: ignore[dict-item]
    assert rule.alert_labels({"x": "1", "severity": "ignored"}) == {
        "x": "1",
        "severity": "critical",
        "alertname": "Foo",
    }
    assert rule.alert_annotations({"x": "1"}, 60)["description"] == "1 1m 0s"
