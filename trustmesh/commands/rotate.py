"""``trustmesh rotate``: the cert-rotation cron job."""

from __future__ import annotations

import json
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.table import Table

from pki.certs import utcnow
from pki.durations import format_duration
from pki.names import port_number
from pki.store import FileStore
from trustmesh.commands.pki import MAX_VALIDITY, bounded_duration
from trustmesh.config import default_store_path
from trustmesh.errors import EXIT_USAGE, CLIError
from trustmesh.rotation_job import ExitCode, RunReport, run_once

# A start delay past a day stops being jitter; unbounded, it overflowed the scheduler's clock.
MAX_JITTER = timedelta(days=1)

EXIT_CODES_HELP = """\b
Exit codes:
  0  success: the issuer was renewed, or nothing was due
  1  a rotation was due and failed (e.g. the anchor key is not in the store)
  2  usage or configuration error (no store, unreadable store, bad flags)
  3  success, but a human must act: the trust anchor is inside its 60-day
     warning window or expired, or a renewed issuer would be cut short by it
  4  another run holds the store lock (nothing was done)
"""


@click.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_store_path,
    show_default="$TRUSTMESH_HOME or ~/.local/share/trustmesh",
    help="The credential store.",
)
@click.option(
    "--renew-before",
    callback=bounded_duration(MAX_VALIDITY),
    help="Renew when less than this is left (e.g. 16h). Default: one third of the life.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; write nothing.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--schedule", metavar="CRON", help="Run as a long-lived process on this cron schedule."
)
@click.option(
    "--jitter",
    callback=bounded_duration(MAX_JITTER, allow_zero=True),
    default="0s",
    show_default=True,
    help="With --schedule: start each run up to this much later.",
)
@click.option(
    "--status-listen",
    metavar="HOST:PORT",
    help="With --schedule: serve /status (JSON) and /metrics here.",
)
def rotate(
    store: Path,
    renew_before: timedelta | None,
    dry_run: bool,
    output: str,
    schedule: str | None,
    jitter: timedelta,
    status_listen: str | None,
) -> None:
    """Renew the issuer once its renewal point has passed; never replace the anchor.

    Idempotent and locked: run it from cron as often as you like. It reports when a human
    must act on the trust anchor instead of touching it.
    """
    fs = FileStore(store)
    if schedule is None:
        # Only a scheduled process serves status or waits a jitter: said now, rather than
        # leaving the user to find the status port never answered.
        if status_listen:
            raise click.UsageError("--status-listen needs --schedule")
        if jitter:
            raise click.UsageError("--jitter needs --schedule")
        report = run_once(fs, now=utcnow(), renew_before=renew_before, dry_run=dry_run)
        _print(report, output)
        sys.exit(int(report.exit_code))
    _run_schedule(fs, schedule, renew_before, dry_run, jitter, status_listen)


def _run_schedule(
    fs: FileStore,
    schedule: str,
    renew_before: timedelta | None,
    dry_run: bool,
    jitter: timedelta,
    status_listen: str | None,
) -> None:
    from trustmesh.scheduler import (
        ScheduleError,
        ScheduleStatus,
        cron_trigger,
        run_scheduled,
        serve_status,
    )

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        trigger = cron_trigger(schedule, jitter_seconds=int(jitter.total_seconds()))
    except ScheduleError as e:
        raise click.BadParameter(str(e), param_hint="--schedule") from None
    status = ScheduleStatus(schedule, fs.root / "rotate-status.json")
    if status_listen:
        host, _, port_text = status_listen.rpartition(":")
        port = port_number(port_text, lowest=0)
        if port is None:
            raise click.BadParameter(
                f"{status_listen!r} is not HOST:PORT with a port in 0..65535",
                param_hint="--status-listen",
            )
        try:
            server = serve_status(status, host.strip("[]") or "127.0.0.1", port)
        except OSError as e:
            raise CLIError(
                f"cannot serve status on {status_listen}: {e.strerror}", EXIT_USAGE
            ) from None
        logging.getLogger("trustmesh.rotate").info(
            "status on http://%s:%d/status", *server.server_address[:2]
        )

    def job() -> RunReport:
        return run_once(fs, now=utcnow(), renew_before=renew_before, dry_run=dry_run)

    scheduler = run_scheduled(job, trigger, status, run_now=True)

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("trustmesh.rotate").info("signal %d: stopping scheduler", signum)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheduler.start()


def _print(report: RunReport, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(report.to_json()))  # one line per run: JSON Lines in a log
        return
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    if report.error:
        click.echo(f"error: {report.error}", err=True)
    if report.plan is not None:
        p = report.plan
        table = Table(title=f"trustmesh rotate: {report.store}", show_header=True)
        table.add_column("certificate")
        table.add_column("status")
        table.add_column("expires")
        table.add_column("left")
        table.add_column("action")
        if report.renewed and report.new_state and report.new_state.issuer:
            new = report.new_state.issuer.certificate
            action = f"renewed (version {report.new_state.version}, until {new.not_after:%Y-%m-%d %H:%M}Z)"
        elif p.issuer.due and report.dry_run:
            action = "due: would renew (dry run)"
        elif p.issuer.due:
            action = "due: cannot renew"
        else:
            action = f"none until {p.issuer.renew_at:%Y-%m-%d %H:%M}Z"
        table.add_row(
            "issuer",
            p.issuer.action.value,
            f"{p.issuer.expires_at:%Y-%m-%d %H:%M}Z",
            format_duration(p.issuer.remaining),
            action,
        )
        table.add_row(
            "trust anchor",
            p.anchor_status.value,
            f"{p.anchor_expires:%Y-%m-%d %H:%M}Z",
            format_duration(p.anchor_expires - p.now),
            "never automatic",
        )
        console.print(table)
    for action in report.human_actions:
        err.print(f"[yellow]human action needed:[/yellow] {action}")
    if report.exit_code is ExitCode.LOCKED:
        err.print("another 'trustmesh rotate' is running; nothing was done (exit 4)")
