"""``trustmesh alerts check`` end to end in-process: real store, real webhook receiver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alerts_testkit import Receiver

from pki.certs import chain_pem
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore
from trustmesh.cli import cli
from trustmesh.errors import run_cli


def _store(
    tmp_path: Path, issuer_age: timedelta, lifetime: timedelta = timedelta(days=365)
) -> FileStore:
    now = datetime.now(UTC)  # the command reads the clock; build the store around it
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=now - issuer_age, lifetime=timedelta(days=3650))
    issue_issuer(store, now=now - issuer_age, lifetime=lifetime)
    return store


def test_nothing_firing_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path, timedelta(days=1))
    assert run_cli(cli, ["alerts", "check", "--store", str(store.root)]) == 0
    assert "no alerts firing (2 certificates from 1 sources)" in capsys.readouterr().out


def test_firing_exits_3_names_the_alert_and_posts_to_the_webhook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, timedelta(days=360))  # 5 days left of 365: warning and critical
    with Receiver() as receiver:
        code = run_cli(
            cli,
            [
                "alerts",
                "check",
                "--store",
                str(store.root),
                "--webhook",
                receiver.url,
                "-o",
                "json",
            ],
        )
    assert code == 3
    report = json.loads(capsys.readouterr().out)
    names = sorted(a["labels"]["alertname"] for a in report["alerts"])
    assert names == ["IssuerExpiringSoon", "IssuerExpiryCritical"]
    ((_, posted),) = receiver.received
    assert sorted(a["labels"]["alertname"] for a in posted["alerts"]) == names  # type: ignore[index]


def test_table_output_names_each_alert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path, timedelta(days=340))
    assert run_cli(cli, ["alerts", "check", "--store", str(store.root)]) == 3
    out = capsys.readouterr().out
    assert "IssuerExpiringSoon" in out and "IssuerExpiryCritical" not in out


def test_unreadable_source_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    assert run_cli(cli, ["alerts", "check", "--scan", str(bad)]) == 1
    assert f"error: file:{bad}: {bad} holds no readable certificate" in capsys.readouterr().err


def test_scan_with_a_role_and_a_failing_alertmanager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, timedelta(days=360))
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(chain_pem([store.issuer().certificate]))
    with Receiver(status=500) as receiver:
        code = run_cli(
            cli, ["alerts", "check", "--scan", f"webhook={pem}", "--alertmanager", receiver.url]
        )
    assert code == 1
    captured = capsys.readouterr()
    assert "CertificateExpiryCritical" in captured.out
    assert "answered HTTP 500" in captured.err


def test_usage_errors(tmp_path: Path) -> None:
    assert (
        run_cli(cli, ["alerts", "check", "--alertmanager", "http://a", "--webhook", "http://b"])
        == 2
    )
    assert run_cli(cli, ["alerts", "check", "--probe", "nohost"]) == 2
    assert run_cli(cli, ["alerts", "exporter", "--listen", "nowhere"]) == 2


@pytest.mark.parametrize(
    ("option", "url", "problem"),
    [
        ("--alertmanager", "alertmanager:9093", "is not an absolute http(s) URL"),
        ("--alertmanager", "http://", "is not an absolute http(s) URL"),
        ("--alertmanager", "http://am:99999", "has a port that is not a number"),
        ("--alertmanager", "http://am:9093/?x=1", "must not carry a query or fragment"),
        ("--webhook", "http://hook /x", "contains whitespace"),
        ("--webhook", "ftp://hook/x", "is not an absolute http(s) URL"),
    ],
)
def test_a_notification_url_that_cannot_work_is_a_usage_error_while_nothing_fires(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, url: str, problem: str
) -> None:
    """It was only tried once an alert fired: a cron job with a mistyped URL ran green until
    the day it had something to say."""
    store = _store(tmp_path, timedelta(days=1))
    assert run_cli(cli, ["alerts", "check", "--store", str(store.root), option, url]) == 2
    err = capsys.readouterr().err
    assert problem in err and repr(url) in err, err


def test_rules_command_writes_clickable_runbook_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = "https://docs.example.com/trustmesh"
    out = tmp_path / "rules"
    assert (
        run_cli(cli, ["alerts", "rules", "--output-dir", str(out), "--runbook-base-url", base]) == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out / 'certificates.yml'}" in printed
    assert (
        f'runbook_url: "{base}/runbooks/IssuerExpiringSoon.md"'
        in (out / "certificates.yml").read_text()
    )
    code = run_cli(cli, ["alerts", "rules", "--output-dir", str(tmp_path / "x"),
                         "--runbook-base-url", "docs.example.com"])  # fmt: skip
    assert code == 1
    assert "not an absolute http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rules_command_reads_the_runbook_base_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUSTMESH_RUNBOOK_BASE_URL", "https://env.example/tm")
    assert run_cli(cli, ["alerts", "rules", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "certificates.yml").read_text()
    assert 'runbook_url: "https://env.example/tm/runbooks/IssuerExpiringSoon.md"' in text


def test_check_posts_absolute_runbook_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, timedelta(days=340))
    base = "https://docs.example.com/trustmesh"
    with Receiver() as receiver:
        code = run_cli(
            cli,
            ["alerts", "check", "--store", str(store.root), "--webhook", receiver.url,
             "--runbook-base-url", base, "-o", "json"],
        )  # fmt: skip
    assert code == 3
    (alert,) = json.loads(capsys.readouterr().out)["alerts"]
    assert alert["annotations"]["runbook_url"] == f"{base}/runbooks/IssuerExpiringSoon.md"
    ((_, posted),) = receiver.received
    (sent,) = posted["alerts"]  # type: ignore[index]
    assert sent["annotations"]["runbook_url"] == f"{base}/runbooks/IssuerExpiringSoon.md"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_zero_serial_in_a_scanned_bundle_is_watched_without_python_warnings(
    tmp_path: Path,
) -> None:
    # Public CA bundles hold such certificates; cryptography warns on each one it parses, and
    # that used to reach the user's terminal.
    cert = tmp_path / "zero-serial.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "zero.key"), "-out", str(cert), "-days", "400",
         "-subj", "/CN=zero serial", "-set_serial", "0"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "trustmesh", "alerts", "check", "--scan", str(tmp_path),
         "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert [c["subject"] for c in json.loads(done.stdout)["certificates"]] == ["CN=zero serial"]
