"""The rotation job at explicit times: every exit code, idempotence, the stage table."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pki.rotation import TRANSITIONS, Event, InvalidTransition, Stage, advance
from pki.store import ANCHOR_KEY, FileStore
from trustmesh.rotation_job import ExitCode, run_once


def test_not_due_does_nothing(make_store, t0):
    store = make_store(t0)
    before = store.current_version()
    report = run_once(store, now=t0 + timedelta(hours=10))
    assert report.exit_code is ExitCode.OK
    assert not report.renewed
    assert report.stages == (Stage.START, Stage.PLANNED, Stage.DONE)
    assert store.current_version() == before


def test_due_renews_once_then_is_idempotent(make_store, t0):
    store = make_store(t0)
    old = store.issuer()
    now = t0 + timedelta(hours=33)  # past 2/3 of a 48h issuer
    report = run_once(store, now=now)
    assert report.exit_code is ExitCode.OK and report.renewed
    new = store.issuer()
    assert new.certificate != old.certificate
    assert new.certificate.not_before == now - timedelta(seconds=20)
    assert new.key.algorithm is old.key.algorithm
    assert report.stages == (Stage.START, Stage.PLANNED, Stage.RENEWING, Stage.DONE)
    again = run_once(store, now=now)
    assert again.exit_code is ExitCode.OK and not again.renewed
    assert store.issuer().certificate == new.certificate


def test_renew_before_overrides_fraction(make_store, t0):
    store = make_store(t0)
    assert not run_once(
        store, now=t0 + timedelta(hours=33), renew_before=timedelta(hours=6)
    ).renewed
    assert run_once(store, now=t0 + timedelta(hours=43), renew_before=timedelta(hours=6)).renewed


def test_dry_run_writes_nothing(make_store, t0):
    store = make_store(t0)
    version = store.current_version()
    report = run_once(store, now=t0 + timedelta(hours=40), dry_run=True)
    assert report.exit_code is ExitCode.OK
    assert report.plan is not None and report.plan.issuer.due
    assert not report.renewed and store.current_version() == version
    assert report.stages[-1] is Stage.DONE


def test_expired_issuer_is_renewed(make_store, t0):
    store = make_store(t0)
    report = run_once(store, now=t0 + timedelta(days=5))
    assert report.exit_code is ExitCode.OK and report.renewed


def test_anchor_in_warning_window_needs_a_human(make_store, t0):
    store = make_store(t0, anchor_lifetime=timedelta(days=90))
    report = run_once(store, now=t0 + timedelta(days=40))  # 50 days left < 60-day window
    assert report.exit_code is ExitCode.HUMAN_ACTION
    assert report.renewed  # the issuer is still kept alive
    assert any("anchor create --staged" in a for a in report.human_actions)


def test_issuer_cut_short_by_anchor_needs_a_human(make_store, t0):
    store = make_store(t0, anchor_lifetime=timedelta(days=3))
    report = run_once(store, now=t0 + timedelta(hours=60))
    assert report.exit_code is ExitCode.HUMAN_ACTION
    assert any("cut short" in a for a in report.human_actions)
    issuer = store.issuer()
    assert issuer.certificate.not_after <= store.load().require_bundle().anchors[0].not_after


def test_expired_anchor_is_never_replaced(make_store, t0):
    store = make_store(t0, anchor_lifetime=timedelta(days=3))
    version = store.current_version()
    report = run_once(store, now=t0 + timedelta(days=4))
    assert report.exit_code is ExitCode.HUMAN_ACTION
    assert not report.renewed and store.current_version() == version
    assert any("expired" in a for a in report.human_actions)


def test_offline_anchor_key_hands_the_renewal_to_a_human(make_store, t0):
    # With the anchor's key kept offline a due renewal is a planned human step (sign and
    # import), not a failure of the job: exit 3 with the commands to run, nothing written.
    store = make_store(t0)
    with store.lock():
        store.commit({ANCHOR_KEY: None}, reason="anchor key moved offline", now=t0)
    version = store.current_version()
    assert run_once(store, now=t0 + timedelta(hours=10)).exit_code is ExitCode.OK  # not due
    report = run_once(store, now=t0 + timedelta(hours=40))
    assert report.exit_code is ExitCode.HUMAN_ACTION
    assert not report.renewed and report.error is None
    assert store.current_version() == version
    (action,) = report.human_actions
    assert "the anchor's key is kept offline" in action
    assert (
        "'trustmesh pki issuer sign --csr'" in action and "'trustmesh pki issuer import'" in action
    )
    assert report.stages[-1] is Stage.NEEDS_HUMAN


def test_missing_store_is_a_configuration_error(tmp_path, t0):
    report = run_once(FileStore(tmp_path / "nothing"), now=t0)
    assert report.exit_code is ExitCode.USAGE
    assert "trustmesh pki anchor create" in (report.error or "")


def test_held_lock_gives_exit_4(make_store, t0):
    store = make_store(t0)
    with FileStore(store.root).lock():
        report = run_once(store, now=t0 + timedelta(hours=40))
    assert report.exit_code is ExitCode.LOCKED
    assert "holds the lock" in (report.error or "")


def test_json_report_shape(make_store, t0):
    report = run_once(make_store(t0), now=t0 + timedelta(hours=40))
    data = report.to_json()
    assert data["exitCode"] == 0 and data["renewed"] is True
    assert data["issuer"]["action"] == "renew"
    assert data["anchor"]["status"] == "ok"
    assert data["newIssuer"]["version"] == 3


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("event", list(Event))
def test_stage_table_every_pair(stage, event):
    if (stage, event) in TRANSITIONS:
        assert advance(stage, event) is TRANSITIONS[(stage, event)]
    else:
        with pytest.raises(InvalidTransition):
            advance(stage, event)
