"""``trustmesh up`` and ``trustmesh demo``: the embedded mesh on this machine.

``up`` runs a mesh file (default: the built-in demo mesh) until Ctrl-C/SIGTERM or
``--duration``; ``demo`` does the same on the demo mesh while driving traffic through it, and
exits 0 only when every request succeeded. Both show a live table of the workloads scraped from
their proxies' admin ``/metrics``; ``-o json`` prints machine-readable output instead.

Exit codes: 0 ok; 1 a failure (a child did not start or kept crashing, a request failed,
another ``up`` holds the home, a port is in use); 2 usage; 3 invalid mesh file; 130 interrupted
during start-up.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from trustmesh.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

EXIT_INVALID_MESH_FILE = 3
SCRAPE_EVERY = 1.0


def _finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    # FloatRange lets nan through (every comparison with it is false): a run that never ends.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds")
    return value


def _options(f: Any) -> Any:
    for decorator in reversed(
        (
            click.option(
                "--home",
                type=click.Path(file_okay=False, path_type=Path),
                help="Local PKI and runtime files (default: $TRUSTMESH_HOME, else "
                "~/.local/share/trustmesh).",
            ),
            click.option(
                "--kex",
                type=click.Choice(["hybrid-required", "hybrid-preferred"]),
                default="hybrid-required",
                show_default=True,
                help="Key exchange policy of every proxy.",
            ),
            click.option(
                "--issuance-lifetime",
                help="Workload certificate lifetime (identity service), e.g. 24h or 30s.",
            ),
            click.option(
                "--duration",
                type=click.FloatRange(min=0, min_open=True),
                callback=_finite,
                help="Stop after this many seconds (default: run until Ctrl-C).",
            ),
            click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table"),
        )
    ):
        f = decorator(f)
    return f


@click.command()
@click.option(
    "--mesh-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Mesh file to run (default: the built-in demo mesh, without traffic).",
)
@_options
def up(mesh_file: Path | None, **opts: Any) -> None:
    """Run the control plane and one proxy (and app) per workload of a mesh file."""
    code = _run_held(mesh_file, traffic=False, **opts)
    if code != EXIT_OK:
        sys.exit(code)


@click.command()
@_options
def demo(**opts: Any) -> None:
    """Run the demo mesh, drive HTTP and TCP traffic through it, and report."""
    code = _run_held(None, traffic=True, **opts)
    if code != EXIT_OK:
        sys.exit(code)


def _run_held(mesh_file: Path | None, *, traffic: bool, home: Path | None, **opts: Any) -> int:
    """:func:`_run` with SIGINT/SIGTERM handled from the first moment, holding the home."""
    from trustmesh.config import default_store_path
    from trustmesh.supervisor import StopSignals
    from trustmesh.up.home import Home, HomeInUse, HomeUnusable

    with StopSignals() as signals:
        paths = Home((home or default_store_path()).expanduser().resolve())
        try:
            with paths.run_lock():
                return _run(mesh_file, traffic=traffic, paths=paths, signals=signals, **opts)
        except (HomeInUse, HomeUnusable) as e:  # only run_lock() raises them
            raise CLIError(str(e)) from None


def _run(
    mesh_file: Path | None,
    *,
    traffic: bool,
    paths: Any,
    signals: Any,
    kex: str,
    issuance_lifetime: str | None,
    duration: float | None,
    output: str,
) -> int:
    from rich.console import Console
    from rich.live import Live

    from destination.errors import DestinationError
    from pki.certs import utcnow
    from pki.errors import PKIError
    from trustmesh.supervisor import Supervisor, SupervisorError, free_ports, wait_for_signal
    from trustmesh.up.demo import TRAFFIC, Traffic, demo_mesh
    from trustmesh.up.plan import PlanError
    from trustmesh.up.runtime import Mesh, UpOptions
    from trustmesh.up.stats import mesh_tls_groups, scrape
    from trustmesh.up.view import render_table, workload_rows

    err = Console(stderr=True)
    out = Console()
    root = paths.root
    if mesh_file is None:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        mesh_file = paths.run_dir / "demo-mesh.yaml"
        mesh_file.write_text(demo_mesh(iter(free_ports(40))), encoding="utf-8")
    try:
        options = UpOptions(mesh_file.resolve(), root, kex, issuance_lifetime)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None

    def progress(message: str) -> None:
        err.print(f"[dim]trustmesh up:[/dim] {message}")

    paths.unpublish()  # one a killed 'up' left behind (this one holds the home now)
    supervisor = Supervisor(paths.logs)
    mesh = Mesh(options, supervisor)
    driver: Traffic | None = None
    failure: str | None = None
    try:
        try:
            mesh.start(utcnow(), progress)
            signals.interrupting = False  # from here on a signal ends the run loop
        except (DestinationError, PlanError) as e:
            raise CLIError(str(e), EXIT_INVALID_MESH_FILE) from None
        except (SupervisorError, PKIError) as e:
            raise CLIError(str(e)) from None
        except KeyboardInterrupt:
            progress("interrupted while starting; stopping")
            return 130
        progress(f"mesh ready; child logs in {paths.logs}")
        try:
            paths.publish(_ready_info(mesh))  # for 'trustmesh check' on this home
        except OSError as e:
            progress(f"cannot write {paths.published} ({e}): 'trustmesh check' will not find it")
        if output == "json" and not traffic:
            _echo_line({"event": "ready", **_ready_info(mesh)})
        if traffic:
            driver = Traffic(mesh.upstream(TRAFFIC, "web."), mesh.upstream(TRAFFIC, "echo."))
            driver.start()
        started = time.monotonic()
        title = "trustmesh demo" if traffic else "trustmesh up"
        # Not a terminal (a log, a pipe): rich would print the last live frame on stop, without
        # a final newline, ahead of the final table; there the final table alone is the output.
        live = (
            Live(console=out, refresh_per_second=2)
            if output == "table" and out.is_terminal
            else None
        )
        last_scrape = 0.0

        def tick() -> bool:
            nonlocal last_scrape
            now = time.monotonic()
            mesh.refresh_tokens(utcnow())
            for message in mesh.renew_issuer(utcnow()):
                progress(message)
            synced = mesh.sync_trust_anchors()
            if synced:
                progress(synced)
            generation = mesh.generation
            for message in mesh.reconcile():
                progress(message)
            if mesh.generation != generation:  # workloads started or stopped
                try:
                    paths.publish(_ready_info(mesh))  # for 'check'
                except OSError as e:
                    progress(f"cannot update {paths.published} ({e})")
                if output == "json" and not traffic:  # for a script following the mesh
                    _echo_line({"event": "changed", **_ready_info(mesh)})
            if live is not None and now - last_scrape >= SCRAPE_EVERY:
                last_scrape = now
                rows = workload_rows(_scrape_all(mesh, scrape), time.time())
                live.update(render_table(rows, f"{title} — {now - started:.0f}s"))
            return duration is not None and now - started >= duration

        if live is not None:
            live.start()
        try:
            wait_for_signal(tick, supervisor, signals)
        except SupervisorError as e:  # a child in a crash loop: stop it all, say which
            failure = str(e)
        finally:
            if driver is not None:
                driver.stop()
            if live is not None:
                live.stop()
        stats = _scrape_all(mesh, scrape)  # while the proxies still run
        elapsed = time.monotonic() - started
    finally:
        signals.interrupting = False  # the stop is bounded; a second Ctrl-C must not cut it short
        paths.unpublish()
        if driver is not None:
            driver.stop()
        supervisor.stop()

    rows = workload_rows(stats, time.time())
    summary: dict[str, Any] = {
        "duration_seconds": round(elapsed, 1),
        "tls_groups": mesh_tls_groups(stats.values()),
        "handshake_failures": sum(s.refused for s in stats.values() if s is not None),
        "workloads": rows,
        "logs": str(paths.logs),
    }
    code = EXIT_OK
    if driver is not None:
        summary = {**driver.tally.summary(), **summary}
        if summary["requests"] == 0 or summary["failures"] != 0:
            code = EXIT_FAILURE
    if failure is not None:
        summary["child_failure"] = failure
        click.echo(f"error: {failure}", err=True)
        code = EXIT_FAILURE
    if output == "json":
        click.echo(json.dumps(summary))
    else:
        out.print(render_table(rows, f"{title} — final"))
        _print_summary(out, summary, traffic)
    return code


def _scrape_all(mesh: Any, scrape: Any) -> dict[str, Any]:
    return {key: scrape(addr) for key, addr in mesh.admin.items() if "/" in key}


def _echo_line(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (a reader acts on each as it comes)."""
    click.echo(json.dumps(record), nl=True)
    sys.stdout.flush()


def _ready_info(mesh: Any) -> dict[str, Any]:
    return {
        "ready": True,
        "home": str(mesh.home.root),
        "logs": str(mesh.home.logs),
        "control_plane": {
            "identity": mesh.control.identity_addr,
            "destination": mesh.control.destination_addr,
            "admin": {k: v for k, v in mesh.admin.items() if "/" not in k},
        },
        "workloads": [
            {
                "workload": p.key,
                "service_account": p.service_account,
                "admin": mesh.admin.get(p.key),
                "inbound": p.inbound_port,
                "outbound": p.outbound_port,
                "app_ports": list(p.app_ports),
                "upstreams": {a: f"{h}:{port}" for h, port, a in p.upstreams},
            }
            for p in mesh.plans
        ],
    }


def _print_summary(console: Any, summary: dict[str, Any], traffic: bool) -> None:
    groups = ", ".join(f"{g} × {n}" for g, n in sorted(summary["tls_groups"].items())) or "none"
    console.print(f"mesh connections by TLS group: {groups}")
    if summary["handshake_failures"]:
        console.print(f"[red]refused or failed handshakes: {summary['handshake_failures']}[/red]")
    if not traffic:
        return
    http, tcp = summary["http"], summary["tcp"]
    balance = " / ".join(f"{k} {v}" for k, v in http["api_replicas"].items()) or "-"
    console.print(
        f"HTTP: {http['requests']} requests, {http['failures']} failed, "
        f"p50 {http['p50_ms']} ms, p99 {http['p99_ms']} ms (client side), api balance {balance}"
    )
    console.print(
        f"TCP echo: {tcp['sessions']} sessions, {tcp['failures']} failed, "
        f"{tcp['bytes_echoed']} bytes echoed"
    )
    for error in summary["errors"][:5]:
        console.print(f"[red]{error}[/red]")
    verdict = "[green]every request succeeded[/green]"
    if summary["failures"] or not summary["requests"]:
        verdict = f"[red]{summary['failures']} of {summary['requests']} requests failed[/red]"
    console.print(verdict)
