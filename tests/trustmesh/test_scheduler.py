"""``trustmesh rotate --schedule``: cron translation, runs, status server, and the CLI exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from alerts_testkit import assert_silent_connections_closed
from apscheduler.triggers.cron import CronTrigger

import trustmesh.scheduler as scheduler_module
from pki.certs import utcnow
from trustmesh.rotation_job import ExitCode, run_once
from trustmesh.scheduler import (
    ScheduleError,
    ScheduleStatus,
    cron_trigger,
    run_scheduled,
    serve_status,
)

TRUSTMESH = [sys.executable, "-m", "trustmesh"]


def test_cron_weekdays_follow_cron_not_apscheduler():
    # "0 3 * * 0" is Sunday 03:00 in cron; APScheduler alone would read 0 as Monday.
    trigger = cron_trigger("0 3 * * 0")
    after = datetime(2026, 11, 21, 12, tzinfo=UTC)  # a Saturday
    nxt = trigger.get_next_fire_time(None, after)
    assert nxt == datetime(2026, 11, 22, 3, tzinfo=UTC)
    assert nxt.strftime("%A") == "Sunday"
    assert cron_trigger("*/15 2-4 * * 1-5").get_next_fire_time(None, after).weekday() == 0


@pytest.mark.parametrize("bad", ["* * * *", "61 * * * *", "0 0 * * 9", "every day"])
def test_invalid_schedules_are_refused(bad):
    with pytest.raises(ScheduleError):
        cron_trigger(bad)


def test_jitter_delays_runs_within_bound():
    trigger = cron_trigger("0 * * * *", jitter_seconds=120)
    after = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
    for _ in range(20):
        nxt = trigger.get_next_fire_time(None, after)
        assert (
            datetime(2026, 11, 21, 13, tzinfo=UTC)
            <= nxt
            <= datetime(2026, 11, 21, 13, 2, tzinfo=UTC)
        )


def test_a_silent_status_connection_is_closed(monkeypatch, tmp_path) -> None:
    """Each connection that sent nothing held a server thread for ever; now it is closed
    after STATUS_CLIENT_TIMEOUT, and /status still answers."""
    monkeypatch.setattr(scheduler_module, "STATUS_CLIENT_TIMEOUT", 0.5)
    status = ScheduleStatus("* * * * *", tmp_path / "status.json")
    server = serve_status(status, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        assert_silent_connections_closed(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_scheduled_runs_record_status_and_serve_it(make_store, tmp_path):
    store = make_store(utcnow() - timedelta(hours=40))
    status = ScheduleStatus("* * * * * *", tmp_path / "status.json")
    scheduler = run_scheduled(
        lambda: run_once(store, now=utcnow()),
        CronTrigger(second="*", timezone=UTC),
        status,
        run_now=True,
    )
    server = serve_status(status, "127.0.0.1", 0)
    thread = threading.Thread(target=scheduler.start, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while status.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status.runs >= 2
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            body = json.load(r)
        assert body["lastRun"]["exitCode"] == 0
        assert body["nextRun"] is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert "trustmesh_rotate_last_exit_code 0" in metrics
        assert "trustmesh_rotate_next_run_timestamp_seconds" in metrics
        on_disk = json.loads((tmp_path / "status.json").read_text())
        assert on_disk["runs"] >= 2
    finally:
        scheduler.shutdown(wait=False)
        server.shutdown()
        server.server_close()
    # Only the first run renewed; the later ones found nothing due.
    assert store.current_version() == 3


def test_cli_exit_code_4_when_another_process_holds_the_lock(make_store):
    store = make_store(utcnow() - timedelta(hours=40))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pki.store import FileStore\n"
            f"with FileStore({str(store.root)!r}).lock():\n"
            "    print('locked', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        proc = subprocess.run(
            [*TRUSTMESH, "rotate", "--store", str(store.root)],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == ExitCode.LOCKED
        assert b"holds the lock" in proc.stderr
        assert f"(pid {holder.pid})".encode() in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_cli_exit_codes_documented_and_usage_errors(tmp_path):
    help_text = subprocess.run(
        [*TRUSTMESH, "rotate", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for code in range(5):
        assert f"\n    {code}  " in help_text
    bad = subprocess.run(
        [*TRUSTMESH, "rotate", "--store", str(tmp_path), "--renew-before", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid duration" in bad.stderr
    missing = subprocess.run(
        [*TRUSTMESH, "rotate", "--store", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith(
        "error: no TrustMesh store"
    )
