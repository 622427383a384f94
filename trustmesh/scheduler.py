"""``trustmesh rotate --schedule CRON``: the rotation job as a long-lived process.

For hosts without cron. APScheduler's cron trigger with jitter, a misfire grace time and
coalescing (a host that slept through several runs does one, not a burst); never two runs at
once. Each run is logged; the last result and the next run time are kept in memory and, when
asked, served over HTTP (``/status`` JSON, ``/metrics`` for Prometheus) and written to a file.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from pki.store import write_file_atomic
from trustmesh.rotation_job import RunReport

log = logging.getLogger("trustmesh.rotate")

_CRON_DOW = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ScheduleError(ValueError):
    """The --schedule expression is not a valid five-field cron expression."""


def _cron_dow(field: str) -> str:
    # APScheduler counts weekdays from Monday=0; cron from Sunday=0 (and 7). Translate numbers.
    out = []
    for token in field.split(","):
        base, _, step = token.partition("/")
        parts = base.split("-")
        if all(p.isdigit() for p in parts):
            if any(int(p) > 7 for p in parts):
                raise ScheduleError(f"day of week {token!r} is out of range 0-7")
            base = "-".join(_CRON_DOW[int(p)] for p in parts)
        out.append(base + (f"/{step}" if step else ""))
    return ",".join(out)


def cron_trigger(expression: str, *, jitter_seconds: int = 0) -> CronTrigger:
    """A CronTrigger (UTC) from ``m h dom mon dow``, with up to ``jitter_seconds`` of jitter."""
    fields = expression.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"schedule {expression!r} must have 5 fields (minute hour day month weekday)"
        )
    minute, hour, day, month, dow = fields
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_cron_dow(dow),
            timezone=UTC,
            jitter=jitter_seconds or None,
        )
    except ValueError as e:
        raise ScheduleError(f"invalid schedule {expression!r}: {e}") from None


class ScheduleStatus:
    """The last run's report and the next run time, shared with the status server."""

    def __init__(self, schedule: str, status_file: Path | None) -> None:
        self.schedule = schedule
        self.status_file = status_file
        self.runs = 0
        self.last: RunReport | None = None
        self.next_run: datetime | None = None
        self._lock = threading.Lock()

    def record(self, report: RunReport, next_run: datetime | None) -> None:
        with self._lock:
            self.runs += 1
            self.last = report
            self.next_run = next_run
            snapshot = self.to_json()
        if self.status_file is not None:
            write_file_atomic(self.status_file, json.dumps(snapshot, indent=2).encode() + b"\n")

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "runs": self.runs,
            "nextRun": self.next_run.isoformat() if self.next_run else None,
            "lastRun": self.last.to_json() if self.last else None,
        }

    def metrics(self) -> str:
        with self._lock:
            lines = [
                "# HELP trustmesh_rotate_runs_total Rotation job runs since the scheduler started.",
                "# TYPE trustmesh_rotate_runs_total counter",
                f"trustmesh_rotate_runs_total {self.runs}",
            ]
            if self.last is not None:
                lines += [
                    "# HELP trustmesh_rotate_last_run_timestamp_seconds When the last run started.",
                    "# TYPE trustmesh_rotate_last_run_timestamp_seconds gauge",
                    f"trustmesh_rotate_last_run_timestamp_seconds {self.last.started.timestamp()}",
                    "# HELP trustmesh_rotate_last_exit_code Exit code of the last run.",
                    "# TYPE trustmesh_rotate_last_exit_code gauge",
                    f"trustmesh_rotate_last_exit_code {int(self.last.exit_code)}",
                ]
            if self.next_run is not None:
                lines += [
                    "# HELP trustmesh_rotate_next_run_timestamp_seconds When the next run is due.",
                    "# TYPE trustmesh_rotate_next_run_timestamp_seconds gauge",
                    f"trustmesh_rotate_next_run_timestamp_seconds {self.next_run.timestamp()}",
                ]
        return "\n".join(lines) + "\n"


# Seconds a status connection may stay silent: without a limit each one opened and left idle
# held a thread for ever.
STATUS_CLIENT_TIMEOUT = 10.0


def serve_status(status: ScheduleStatus, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/status`` and ``/metrics`` from a daemon thread; returns the bound server."""

    class Handler(BaseHTTPRequestHandler):
        timeout = STATUS_CLIENT_TIMEOUT

        def do_GET(self) -> None:
            if self.path == "/status":
                body, ctype = json.dumps(status.to_json()).encode(), "application/json"
            elif self.path == "/metrics":
                body, ctype = status.metrics().encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404, "try /status or /metrics")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("status server: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="rotate-status").start()
    return server


def run_scheduled(
    job: Callable[[], RunReport],
    trigger: CronTrigger,
    status: ScheduleStatus,
    *,
    misfire_grace_seconds: int = 300,
    run_now: bool = False,
) -> BlockingScheduler:
    """Build the scheduler that calls ``job`` on ``trigger``; the caller starts it."""
    scheduler = BlockingScheduler(timezone=UTC)

    def tick() -> None:
        report = job()
        jobs = scheduler.get_jobs()
        next_run = jobs[0].next_run_time if jobs else None
        status.record(report, next_run)
        log.info(
            "rotate run: stage=%s exit=%d renewed=%s next=%s%s",
            report.stage.value,
            int(report.exit_code),
            report.renewed,
            next_run.isoformat() if next_run else "-",
            f" error={report.error}" if report.error else "",
        )
        for action in report.human_actions:
            log.warning("human action needed: %s", action)

    extra: dict[str, Any] = {}
    if run_now:  # APScheduler pauses a job whose next_run_time is given as None: omit it
        extra["next_run_time"] = datetime.now(UTC)
    scheduler.add_job(
        tick,
        trigger,
        id="rotate",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=misfire_grace_seconds,
        **extra,
    )
    return scheduler
