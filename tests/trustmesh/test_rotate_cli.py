"""``trustmesh rotate`` flags through the CLI's error boundary: bad values are usage errors."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import timedelta

import pytest
from click.testing import CliRunner

from pki.certs import utcnow
from trustmesh.cli import cli
from trustmesh.errors import run_cli
from trustmesh.rotation_job import ExitCode


@dataclass
class Run:
    code: int
    out: str
    err: str


def tm(*args: str) -> Run:
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        try:
            code = run_cli(cli, list(args))
        except SystemExit as e:  # rotate exits with its documented code itself
            code = int(e.code or 0)
    return Run(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.mark.parametrize("value", ["0s", "0.0000001s", "99999999d", "1000000d"])
def test_renew_before_out_of_range_is_a_usage_error(make_store, value):
    # Exit 1 means "a rotation was due and failed" to whoever watches the cron job; a bad
    # flag must not look like that (0s was exit 1, 99999999d an OverflowError traceback).
    store = make_store(utcnow() - timedelta(hours=40))  # due
    before = store.current_version()
    run = tm("rotate", "--store", str(store.root), "--renew-before", value)
    assert run.code == ExitCode.USAGE, run.err
    assert "--renew-before" in run.err and "Traceback" not in run.err
    run = tm("pki", "inspect", str(store.root), "--renew-before", value)
    assert run.code == 2, run.err
    assert "--renew-before" in run.err and "Traceback" not in run.err
    assert store.current_version() == before


@pytest.mark.parametrize("value", ["99999999d", "2d"])
def test_schedule_jitter_out_of_range_is_a_usage_error(make_store, value):
    # A jitter past the year 9999 crashed the scheduler with an OverflowError on its first tick.
    store = make_store()
    run = tm("rotate", "--store", str(store.root), "--schedule", "*/15 * * * *", "--jitter", value)
    assert run.code == ExitCode.USAGE, run.err
    assert "--jitter" in run.err and "at most 1d" in run.err


@pytest.mark.parametrize(
    ("option", "value"), [("--status-listen", "127.0.0.1:0"), ("--jitter", "10s")]
)
def test_scheduled_only_options_without_a_schedule_are_a_usage_error(make_store, option, value):
    # They were ignored: a one-shot run with --status-listen never served anything.
    store = make_store(utcnow() - timedelta(hours=40))  # due: nothing may be done either
    before = store.current_version()
    run = tm("rotate", "--store", str(store.root), option, value)
    assert run.code == ExitCode.USAGE, run.err
    assert f"{option} needs --schedule" in run.err
    assert store.current_version() == before


def test_a_status_port_in_use_is_named_and_exit_2(make_store):
    store = make_store()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        run = tm("rotate", "--store", str(store.root), "--schedule", "0 0 1 1 *",
                 "--status-listen", addr)  # fmt: skip
    assert run.code == ExitCode.USAGE, run.err
    assert f"error: cannot serve status on {addr}: Address already in use" in run.err


def test_json_output_is_one_line_per_run(make_store):
    # README's crontab appends '-o json' to a log file: one record per line (JSON Lines), so
    # 'tail -n1 | jq' or a log shipper sees each run whole.
    store = make_store(utcnow() - timedelta(hours=40))  # due
    for expect_renewed in (True, False):
        run = tm("rotate", "--store", str(store.root), "-o", "json")
        assert run.code == ExitCode.OK, run.err
        assert run.out.count("\n") == 1 and run.out.endswith("}\n")
        assert json.loads(run.out)["renewed"] is expect_renewed
