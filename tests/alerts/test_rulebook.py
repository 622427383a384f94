from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from alerts.errors import RuleFileError
from alerts.rulebook import RULES_DIR, AlertRule, link_runbooks, load_rules, write_rules

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
    "KeyExchangeRefused",
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


BASE = "https://git.example.com/platform/trustmesh/-/blob/main"


def test_runbook_links_become_absolute_and_nothing_else_changes() -> None:
    for path in sorted(RULES_DIR.glob("*.yml")):
        before = path.read_text()
        after = link_runbooks(before, BASE + "/", str(path))  # a trailing slash is dropped
        changed = [
            (old, new)
            for old, new in zip(before.splitlines(), after.splitlines(), strict=True)
            if old != new
        ]
        assert changed, path
        for old, new in changed:
            name = old.split("runbooks/")[1].removesuffix(".md")
            assert new == old.replace(f"runbooks/{name}.md", f'"{BASE}/runbooks/{name}.md"')
    shipped, linked = load_rules(), load_rules(runbook_base=BASE)
    assert shipped.keys() == linked.keys()
    for name, rules in linked.items():
        for old_rule, rule in zip(shipped[name], rules, strict=True):
            assert rule.annotations["runbook_url"] == f"{BASE}/runbooks/{name}.md"
            assert rule.expr == old_rule.expr and rule.labels == old_rule.labels
            assert {k: v for k, v in rule.annotations.items() if k != "runbook_url"} == {
                k: v for k, v in old_rule.annotations.items() if k != "runbook_url"
            }


@needs_promtool
def test_written_rules_pass_promtool(tmp_path: Path) -> None:
    written = write_rules(tmp_path / "prometheus" / "rules", runbook_base=BASE)
    assert sorted(p.name for p in written) == sorted(p.name for p in RULES_DIR.glob("*.yml"))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", *map(str, written)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in written)
    # Without a base the shipped files are copied as they are.
    plain = write_rules(tmp_path / "plain")
    assert [p.read_text() for p in plain] == [(RULES_DIR / p.name).read_text() for p in plain]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://docs.example.com/tm", "absolute http"),
        ("docs.example.com/tm", "absolute http"),
        ("https:///tm", "absolute http"),
        ("https://docs.example.com/tm?ref=main", "query or fragment"),
        ("https://docs.example.com/tm#top", "query or fragment"),
        ("https://docs.example.com/my runbooks", "whitespace"),
        ('https://docs.example.com/"x', "quote"),
    ],
)
def test_bad_runbook_base_urls_are_refused_and_nothing_is_written(
    tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(RuleFileError, match=message):
        write_rules(tmp_path / "out", runbook_base=url)
    assert not (tmp_path / "out").exists()


def test_a_link_that_cannot_be_rewritten_is_named_and_the_output_is_kept(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.yml").write_text((RULES_DIR / "certificates.yml").read_text())
    folded = yaml.safe_dump({"groups": [{"name": "g", "rules": [GOOD]}]}).replace(
        "runbook_url: runbooks/Foo.md", "runbook_url: >-\n          runbooks/Foo.md"
    )
    (source / "b.yml").write_text(folded)
    assert load_rules(source)["Foo"][0].annotations["runbook_url"] == "runbooks/Foo.md"
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.yml").write_text("# what Prometheus loads today\n")
    with pytest.raises(RuleFileError, match=r"alert 'Foo'.*one line"):
        write_rules(out, directory=source, runbook_base=BASE)
    assert (out / "a.yml").read_text() == "# what Prometheus loads today\n"  # not half-updated
    assert sorted(p.name for p in out.iterdir()) == ["a.yml"]


def test_the_source_directory_is_not_an_output(tmp_path: Path) -> None:
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [GOOD]}]}))
    with pytest.raises(RuleFileError, match="source directory"):
        write_rules(tmp_path, directory=tmp_path, runbook_base=BASE)
