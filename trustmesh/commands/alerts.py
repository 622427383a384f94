"""``trustmesh alerts``: the expiry exporter and the cron-friendly alert check."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from alerts.checker import EXIT_ERROR, CheckReport, check
from alerts.errors import AlertsError
from alerts.exporter import DEFAULT_INTERVAL, Exporter, scan
from alerts.notifier import check_url, notify_alertmanager, notify_webhook
from alerts.rulebook import RULES_DIR, load_rules, write_rules
from alerts.sources import (
    DEFAULT_PROBE_TIMEOUT,
    ProxySource,
    Source,
    parse_address,
    sources_from,
)
from alerts.templating import humanize_duration
from trustmesh.config import default_store_path, duration_option
from trustmesh.errors import CLIError

CHECK_EXIT_CODES = """\b
Exit codes:
  0  nothing fires
  1  error: a source could not be read, or the notification failed
  3  alerts fire (each is named in the output)
"""


def _seconds(ctx: click.Context, param: click.Parameter, value: str) -> float:
    delta = duration_option(ctx, param, value)
    if delta is None:
        raise click.BadParameter("a duration such as 30s is required")
    return delta.total_seconds()


def _source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--store",
            type=click.Path(file_okay=False, path_type=Path),
            help="A TrustMesh store: its trust anchors and issuer. "
            "Default when no source is given: $TRUSTMESH_HOME or ~/.local/share/trustmesh "
            "('check' adds the proxies of a trustmesh up running on it).",
        ),
        click.option(
            "--scan",
            "scans",
            multiple=True,
            metavar="[ROLE=]PATH",
            help="A certificate file or a directory of them; ROLE (trust_anchor, issuer, "
            "workload, webhook, other) overrides the role guessed from each certificate.",
        ),
        click.option(
            "--probe",
            "probes",
            multiple=True,
            metavar="[ROLE=]HOST:PORT",
            help="A TLS endpoint whose presented certificates are watched.",
        ),
        click.option(
            "--proxy",
            "proxies",
            multiple=True,
            metavar="ADMIN_HOST:PORT",
            help="A TrustMesh proxy's admin address: its workload certificate is watched.",
        ),
        click.option(
            "--probe-timeout",
            default=f"{int(DEFAULT_PROBE_TIMEOUT)}s",
            show_default=True,
            callback=_seconds,
            help="Connect + handshake limit per probe.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _sources(
    store: Path | None,
    scans: tuple[str, ...],
    probes: tuple[str, ...],
    proxies: tuple[str, ...],
    probe_timeout: float,
    *,
    discover: bool = False,
) -> list[Source]:
    """The sources asked for; given none, the default store and, with ``discover``, the
    proxies of a ``trustmesh up`` running on it (found anew at each run)."""
    found: list[Source] = []
    try:
        if store is None and not scans and not probes and not proxies:
            store = default_store_path()
            if discover:
                found, pid = _running_proxies(store, probe_timeout)
                if pid is not None:
                    click.echo(
                        f"watching the {len(found)} proxies of the trustmesh up running on "
                        f"{store} (pid {pid}) too",
                        err=True,
                    )
        sources = sources_from(store, scans, probes, proxies=proxies, probe_timeout=probe_timeout)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return [*sources, *found]


def _running_proxies(store: Path, probe_timeout: float) -> tuple[list[Source], int | None]:
    """A source for each proxy of a ``trustmesh up`` running on ``store``, and its pid (none
    and None when no ``up`` runs there)."""
    from trustmesh.up.home import running_mesh  # (imports identity: only when needed)

    running = running_mesh(store)
    if running is None:
        return [], None
    return [ProxySource(address, probe_timeout) for address in running.proxies], running.pid


def _discovering(store: Path, probe_timeout: float) -> Callable[[], list[Source]]:
    """The store, and the proxies of a ``trustmesh up`` running on it, looked up anew at each
    call: an exporter runs for days, and an ``up`` restarted meanwhile has other ports."""
    base = sources_from(store, probe_timeout=probe_timeout)

    def current() -> list[Source]:
        return [*base, *_running_proxies(store, probe_timeout)[0]]

    return current


@click.group()
def alerts() -> None:
    """Expiry exporter and cron-friendly alert checks."""


@alerts.command()
@_source_options
@click.option(
    "--listen",
    required=True,
    metavar="HOST:PORT",
    help="Where to serve /metrics (port 0 picks a free port).",
)
@click.option(
    "--interval",
    default=f"{int(DEFAULT_INTERVAL)}s",
    show_default=True,
    callback=_seconds,
    help="How often sources are re-read (scrapes never wait for it).",
)
def exporter(
    store: Path | None,
    scans: tuple[str, ...],
    probes: tuple[str, ...],
    proxies: tuple[str, ...],
    probe_timeout: float,
    listen: str,
    interval: float,
) -> None:
    """Publish certificate NotBefore/NotAfter/renewal-due timestamps for Prometheus.

    Runs until SIGINT or SIGTERM.
    """
    try:
        host, port = parse_address(listen, allow_port_zero=True)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    sources: list[Source] | Callable[[], list[Source]]
    if store is None and not scans and not probes and not proxies:
        store = default_store_path()
        sources = _discovering(store, probe_timeout)
        click.echo(
            f"watching {store}, and the proxies of any trustmesh up running on it "
            "(looked for at each scan)",
            err=True,
        )
    else:
        sources = _sources(store, scans, probes, proxies, probe_timeout)
    server = Exporter(sources, clock=time.time, interval=interval)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bound = server.start(host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving http://{shown}:{bound}/metrics", err=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


def _report_json(report: CheckReport, now: float) -> str:
    return json.dumps(
        {
            "alerts": [
                {"labels": dict(a.labels), "annotations": dict(a.annotations), "value": a.value}
                for a in report.alerts
            ],
            "errors": [{"source": s.source, "error": s.error} for s in report.errors],
            "certificates": [
                {
                    **c.labels,
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                    "renewal_due": c.renewal_due,
                }
                for c in report.inventory.certs
            ],
            "exit_code": report.exit_code,
            "checked_at": now,
        },
        indent=2,
    )


def _report_table(report: CheckReport, now: float) -> None:
    # Piped output (cron mail, logs) must not truncate alert names to an 80-column guess.
    console = Console(width=None if sys.stdout.isatty() else 240)
    if report.alerts:
        table = Table("ALERT", "SEVERITY", "ROLE", "SUBJECT", "LEFT", "SOURCE", box=None)
        by_fingerprint = {(c.fingerprint, c.source): c for c in report.inventory.certs}
        for alert in report.alerts:
            cert = by_fingerprint[(alert.labels["fingerprint"], alert.labels["source"])]
            table.add_row(
                alert.name,
                alert.severity,
                cert.role,
                cert.subject,
                humanize_duration(cert.not_after - now),
                cert.source,
            )
        console.print(table)
    else:
        count, sources = len(report.inventory.certs), len(report.inventory.sources)
        console.print(f"no alerts firing ({count} certificates from {sources} sources)")


def _rules_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--rules",
        "rules_dir",
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        default=RULES_DIR,
        show_default="the rules shipped with TrustMesh",
        help=help_text,
    )


_runbook_base_option = click.option(
    "--runbook-base-url",
    "runbook_base",
    metavar="URL",
    envvar="TRUSTMESH_RUNBOOK_BASE_URL",
    help="Where the runbooks are published: each alert's runbook_url becomes "
    "URL/runbooks/<AlertName>.md (default: the path in the repository).",
)


@alerts.command("rules")
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the rule files into (Prometheus' rule_files points here).",
)
@_rules_option("Rule files to write out.")
@_runbook_base_option
def rules_command(output_dir: Path, rules_dir: Path, runbook_base: str | None) -> None:
    """Write the alert rule files for Prometheus, with clickable runbook links.

    Nothing is written unless every file renders and checks; each file is replaced atomically.
    """
    try:
        written = write_rules(output_dir, directory=rules_dir, runbook_base=runbook_base)
    except AlertsError as e:
        raise CLIError(str(e), EXIT_ERROR) from None
    for path in written:
        click.echo(f"wrote {path}")


def _notify_url(value: str | None, what: str, *, base: bool = False) -> str | None:
    """A usage error now for a URL that could never be posted to (see ``check_url``)."""
    if value is None:
        return None
    try:
        return check_url(value, what=what, base=base)
    except AlertsError as e:
        raise click.BadParameter(str(e)) from None


@alerts.command("check", epilog=CHECK_EXIT_CODES)
@_source_options
@click.option(
    "--alertmanager",
    metavar="URL",
    callback=lambda _c, _p, v: _notify_url(v, "Alertmanager", base=True),
    help="Post firing alerts to this Alertmanager.",
)
@click.option(
    "--webhook",
    metavar="URL",
    callback=lambda _c, _p, v: _notify_url(v, "webhook"),
    help="Post firing alerts to this webhook instead.",
)
@click.option(
    "--valid-for",
    default="1h",
    show_default=True,
    callback=_seconds,
    help="endsAt of posted alerts; choose more than the cron period.",
)
@_rules_option("Rule files whose labels and annotations the alerts carry.")
@_runbook_base_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def check_command(
    store: Path | None,
    scans: tuple[str, ...],
    probes: tuple[str, ...],
    proxies: tuple[str, ...],
    probe_timeout: float,
    alertmanager: str | None,
    webhook: str | None,
    valid_for: float,
    rules_dir: Path,
    runbook_base: str | None,
    output: str,
) -> int:
    """Evaluate the certificate alert thresholds once, without Prometheus (for cron)."""
    if alertmanager and webhook:
        raise click.UsageError("give --alertmanager or --webhook, not both")
    try:
        rules = load_rules(rules_dir, runbook_base=runbook_base)
    except AlertsError as e:
        raise CLIError(str(e), EXIT_ERROR) from None
    now = time.time()
    sources = _sources(store, scans, probes, proxies, probe_timeout, discover=True)
    report = check(scan(sources, now), now, rules)
    if output == "json":
        click.echo(_report_json(report, now))
    else:
        _report_table(report, now)
    for status in report.errors:
        click.echo(f"error: {status.source}: {status.error}", err=True)
    if report.alerts and (alertmanager or webhook):
        try:
            if alertmanager:
                notify_alertmanager(alertmanager, report.alerts, now, valid_for=valid_for)
            elif webhook:
                notify_webhook(webhook, report.alerts, now, valid_for=valid_for)
        except AlertsError as e:
            raise CLIError(str(e), EXIT_ERROR) from None
    sys.stdout.flush()
    return report.exit_code
