"""``trustmesh check``: identity checks on real stores, readiness and bundle checks against real
HTTP admin servers on 127.0.0.1, the Linkerd JSON shape and the exit codes."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alerts_testkit import http_server

from pki.rotation import init_anchor, issue_issuer, request_issuer
from pki.store import FileStore
from trustmesh.checks import (
    ERROR,
    RUNBOOKS_DIR,
    SUCCESS,
    WARNING,
    RunbookLinks,
    identity_category,
    run,
)
from trustmesh.cli import cli
from trustmesh.errors import run_cli

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def admin(
    ready: bool, digest: str | None = None, issuer: str | None = None
) -> contextlib.AbstractContextManager[str]:
    """A real admin endpoint: /ready (200 or 503) and /metrics with a proxy's bundle digest or
    an identity service's issuer fingerprint."""

    def respond(path: str) -> tuple[int, bytes]:
        if path == "/ready":
            return (200, b"ready\n") if ready else (503, b"not ready\n")
        if path == "/metrics":
            text = f'trustmesh_proxy_trust_bundle_info{{digest="{digest}"}} 1.0\n' if digest else ""
            if issuer:
                text += (
                    "trustmesh_cert_not_after_timestamp_seconds{"
                    f'fingerprint="{issuer}",role="issuer",source="identity",subject="CN=i"}} 2e9\n'
                    "trustmesh_cert_not_after_timestamp_seconds{"
                    'fingerprint="0ac0",role="trust_anchor",source="identity",subject="CN=a"} 3e9\n'
                )
            return 200, text.encode()
        return 404, b""

    return http_server(respond)


def _store(tmp_path: Path, at: datetime, issuer_lifetime: timedelta) -> FileStore:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=at, lifetime=timedelta(days=3650))
    issue_issuer(store, now=at, lifetime=issuer_lifetime)
    return store


def _results(store: FileStore, now: datetime) -> dict[str, str]:
    category = identity_category(store.load(), now)
    return {c.description: c.result for c in category.checks}


def test_identity_checks_follow_linkerds_list(tmp_path: Path) -> None:
    store = _store(tmp_path, T0, timedelta(hours=48))
    results = _results(store, T0 + timedelta(hours=1))
    assert list(results) == [
        "certificate config is valid",
        "trust anchors are using supported crypto algorithm",
        "trust anchors are within their validity period",
        "trust anchors are not expiring soon",
        "issuer cert is using supported crypto algorithm",
        "issuer cert is within its validity period",
        "issuer cert is not expiring soon",
        "issuer cert is issued by the trust anchor",
    ]
    assert set(results.values()) == {SUCCESS}


def test_a_48h_issuer_warns_only_when_its_renewal_is_overdue(tmp_path: Path) -> None:
    store = _store(tmp_path, T0, timedelta(hours=48))
    # Linkerd's fixed 60 days would warn from the first second; the renewal window does not.
    assert _results(store, T0 + timedelta(hours=30))["issuer cert is not expiring soon"] == SUCCESS
    assert _results(store, T0 + timedelta(hours=40))["issuer cert is not expiring soon"] == WARNING
    assert _results(store, T0 + timedelta(hours=45))["issuer cert is not expiring soon"] == ERROR


def test_an_expired_issuer_is_fatal_and_stops_the_run(tmp_path: Path) -> None:
    store = _store(tmp_path, T0, timedelta(hours=48))
    report = run([identity_category(store.load(), T0 + timedelta(days=3))])
    (category,) = report.categories
    assert category.checks[-1].description == "issuer cert is within its validity period"
    assert category.checks[-1].result == ERROR and category.checks[-1].fatal
    assert category.checks[-1].runbook == "IssuerExpiryCritical"
    assert not report.success


def test_hints_link_the_published_runbook_or_this_installations_file() -> None:
    assert RunbookLinks("https://git.example/tm/-/blob/main").hint("IssuerRefused") == (
        "see https://git.example/tm/-/blob/main/runbooks/IssuerRefused.md"
    )
    local = RunbookLinks(directory=RUNBOOKS_DIR).hint("IssuerRefused")
    assert (
        local == f"see {RUNBOOKS_DIR}/IssuerRefused.md"
        and (RUNBOOKS_DIR / "IssuerRefused.md").is_file()
    )
    assert RunbookLinks().hint("IssuerRefused") == "see runbooks/IssuerRefused.md"


def test_cli_everything_healthy_exits_0_with_linkerd_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    digest = store.trust_bundle().digest
    issuer = store.load().require_issuer().certificate.fingerprint
    with (
        admin(True, issuer=issuer) as identity,
        admin(True) as destination,
        admin(True, digest) as proxy,
    ):
        code = run_cli(
            cli,
            ["check", "--store", str(store.root), "--identity", identity, "--destination", destination,
             "--proxy", proxy, "-o", "json"],
        )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["success"] is True
    assert [c["categoryName"] for c in report["categories"]] == [
        "trustmesh-identity", "trustmesh-control-plane", "trustmesh-identity-data-plane",
    ]  # fmt: skip
    check = report["categories"][1]["checks"][0]
    assert check == {"description": "identity service is ready", "result": "success"}
    assert all(c["result"] == "success" for cat in report["categories"] for c in cat["checks"])


def test_cli_failures_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    with admin(False) as identity, admin(True, "old-digest") as proxy:
        code = run_cli(
            cli, ["check", "--store", str(store.root), "--identity", identity, "--proxy", proxy]
        )
    out = capsys.readouterr().out
    assert code == 1
    assert "× identity service is ready" in out and "answered HTTP 503" in out
    # Every hint names a runbook this checkout has, by a path that opens from anywhere.
    hints = [line.strip()[4:] for line in out.splitlines() if line.strip().startswith("see ")]
    assert f"{RUNBOOKS_DIR}/ControlPlaneNotReady.md" in hints
    assert all(Path(h).is_absolute() and Path(h).is_file() for h in hints)
    assert "‼ data plane proxies certificate match CA" in out
    assert f"must be restarted: {proxy}" in out


def test_cli_hints_use_the_runbook_base_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    with admin(False) as identity:
        args = ["check", "--store", str(store.root), "--identity", identity, "-o", "json"]
        assert run_cli(cli, [*args, "--runbook-base-url", "https://runbooks.example/tm/"]) == 1
        check = json.loads(capsys.readouterr().out)["categories"][1]["checks"][0]
        assert check["hint"] == "see https://runbooks.example/tm/runbooks/ControlPlaneNotReady.md"
        monkeypatch.setenv("TRUSTMESH_RUNBOOK_BASE_URL", "https://env.example")
        assert run_cli(cli, args) == 1
        check = json.loads(capsys.readouterr().out)["categories"][1]["checks"][0]
        assert check["hint"] == "see https://env.example/runbooks/ControlPlaneNotReady.md"


def test_cli_refuses_a_bad_runbook_base_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    args = ["check", "--store", str(store.root), "--runbook-base-url", "runbooks.example?x=1"]
    assert run_cli(cli, args) == 2
    err = capsys.readouterr().err
    assert "--runbook-base-url" in err and "not an absolute http(s) URL" in err


def test_cli_warning_only_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path, datetime.now(UTC) - timedelta(days=340), timedelta(days=365))
    assert run_cli(cli, ["check", "--store", str(store.root)]) == 0
    assert "‼ issuer cert is not expiring soon" in capsys.readouterr().out


def test_an_issuer_csr_waiting_long_for_its_signature_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An issuer CSR out to an offline anchor: nothing said while it is fresh, a warning with
    its age and what to do once it has waited over a day. Its age is that of its key: later
    store versions (another commit meanwhile) do not reset it, a new key does."""
    now = datetime.now(UTC)
    store = _store(tmp_path, now - timedelta(days=3), timedelta(days=365))
    request_issuer(store, now=now - timedelta(hours=30))
    init_anchor(store, now=now - timedelta(hours=2), stage=True)  # a later, unrelated version
    assert store.pending_issuer_key_since() == now - timedelta(hours=30)
    assert run_cli(cli, ["check", "--store", str(store.root), "-o", "json"]) == 0
    (identity, *_) = json.loads(capsys.readouterr().out)["categories"]
    pending = identity["checks"][-1]
    assert pending["description"] == "no issuer CSR has waited long for its signature"
    assert pending["result"] == "warning" and "IssuerExpiringSoon.md" in pending["hint"]
    assert pending["error"].startswith("an issuer CSR has waited 30 h for its signature")
    assert "'trustmesh pki issuer csr --new-key'" in pending["error"]
    # A new key (its CSR just made) is not overdue.
    request_issuer(store, now=now - timedelta(minutes=5), new_key=True)
    assert store.pending_issuer_key_since() == now - timedelta(minutes=5)
    assert run_cli(cli, ["check", "--store", str(store.root)]) == 0
    assert "√ no issuer CSR has waited long for its signature" in capsys.readouterr().out
    # No store, no pending key: nothing to date (and without a pending key the check is not
    # listed: Linkerd's eight stay eight, test_identity_checks_follow_linkerds_list).
    assert FileStore(tmp_path / "none").pending_issuer_key_since() is None


def test_cli_missing_store_is_a_fatal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(cli, ["check", "--store", str(tmp_path / "none"), "-o", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    (check,) = report["categories"][0]["checks"]
    assert check["result"] == "error" and "no TrustMesh store" in check["error"]


def test_a_staged_anchor_waits_for_every_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The distribution step of a staged anchor rotation: a proxy still on the bundle without
    # the staged anchor is named, with the warning not to activate yet; once it has the
    # bundle, the check passes.
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    before = store.trust_bundle().digest
    staged = init_anchor(store, now=datetime.now(UTC), stage=True).next_anchor
    assert staged is not None
    with admin(True, before) as proxy:
        code = run_cli(cli, ["check", "--store", str(store.root), "--proxy", proxy])
    out = capsys.readouterr().out
    assert code == 0  # a warning, not a failure
    assert f"must be restarted: {proxy}; do not activate the staged anchor" in out
    assert staged.fingerprint[:16] in out
    with admin(True, store.trust_bundle().digest) as proxy:
        code = run_cli(cli, ["check", "--store", str(store.root), "--proxy", proxy, "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["categories"][-1]["checks"][-1] == {
        "description": "data plane proxies certificate match CA",
        "result": "success",
    }


def test_cli_checks_the_mesh_a_running_up_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trustmesh.up.home import Home

    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    home = Home(store.root)
    home.run_dir.mkdir()
    digest = store.trust_bundle().digest
    with admin(True) as identity, admin(True) as destination, admin(False, digest) as proxy:
        home.publish(  # as 'up' does once ready (this test's process stands for 'up')
            {
                "control_plane": {"admin": {"identity": identity, "destination": destination}},
                "workloads": [{"workload": "shop/web-0", "admin": proxy}],
            }
        )
        assert run_cli(cli, ["check", "--store", str(store.root)]) == 1
        captured = capsys.readouterr()
        assert "√ identity service is ready" in captured.out
        assert f"proxies are not ready: shop/web-0 ({proxy}) (" in captured.out
        assert f"running on {store.root} (pid {os.getpid()})" in captured.err
        # Addresses given on the command line are checked instead.
        assert run_cli(cli, ["check", "--store", str(store.root), "--identity", identity]) == 0
        captured = capsys.readouterr()
        assert "data-plane" not in captured.out and "running on" not in captured.err
        # The 'up' that published it has ended (killed outright: it left the file behind).
        data = json.loads(home.published.read_bytes())
        home.published.write_text(json.dumps({**data, "process_start": -1}))
        assert run_cli(cli, ["check", "--store", str(store.root), "-o", "json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [c["categoryName"] for c in report["categories"]] == ["trustmesh-identity"]


def test_cli_says_when_identity_does_not_sign_with_the_stores_issuer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, datetime.now(UTC), timedelta(days=365))
    current = store.load().require_issuer().certificate.fingerprint
    args = ["check", "--store", str(store.root), "-o", "json"]
    with admin(True, issuer=current) as identity:
        assert run_cli(cli, [*args, "--identity", identity]) == 0
    checks = json.loads(capsys.readouterr().out)["categories"][1]["checks"]
    assert checks[1] == {
        "description": "identity service signs with the store's issuer",
        "result": "success",
    }
    # After a rotation the service still signs with the one before (refused, or not reloaded).
    old = "9f" * 32
    with admin(True, issuer=old) as identity:
        assert run_cli(cli, [*args, "--identity", identity]) == 0  # a warning
    check = json.loads(capsys.readouterr().out)["categories"][1]["checks"][1]
    assert check["result"] == "warning"
    assert check["hint"].endswith("IssuerRefused.md")
    assert f"the store's current issuer is {current[:16]}" in check["error"]
    assert f"signs with {old[:16]}: it has not loaded the store's issuer" in check["error"]
    # A service that publishes no issuer is said to, and one not ready is not asked.
    with admin(True) as identity:
        run_cli(cli, [*args, "--identity", identity])
    assert "signs with none it publishes" in capsys.readouterr().out
    with admin(False, issuer=old) as identity:
        assert run_cli(cli, [*args, "--identity", identity]) == 1
    checks = json.loads(capsys.readouterr().out)["categories"][1]["checks"]
    assert [c["description"] for c in checks] == ["identity service is ready"]
