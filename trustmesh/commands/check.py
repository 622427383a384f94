"""``trustmesh check``: health checks of the PKI, the control plane and the proxies."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from alerts.errors import AlertsError
from alerts.rulebook import runbook_base_url
from pki.certs import utcnow
from pki.errors import PKIError
from pki.store import FileStore, StoreState
from trustmesh.checks import (
    ERROR,
    RUNBOOKS_DIR,
    WARNING,
    Category,
    Report,
    RunbookLinks,
    control_plane_category,
    data_plane_category,
    identity_category,
    named,
    probe_admin,
    run,
)
from trustmesh.config import admin_timeout_option, default_store_path

EPILOG = """\b
Exit codes:
  0  every check passed or only warned
  1  at least one check failed
"""

MARKS = {"success": ("√", "green"), WARNING: ("‼", "yellow"), ERROR: ("×", "red")}


def _print(report: Report, links: RunbookLinks) -> None:
    for category in report.categories:
        click.echo(category.name)
        click.echo("-" * len(category.name))
        for check in category.checks:
            mark, colour = MARKS[check.result]
            click.echo(f"{click.style(mark, fg=colour)} {check.description}")
            if check.result != "success":
                click.echo(f"    {check.error}")
                click.echo(f"    {links.hint(check.runbook)}")
        click.echo()
    status = "passed" if report.success else "failed"
    click.echo(f"Status check results are {click.style(mark_of(report), bold=True)} ({status})")


def mark_of(report: Report) -> str:
    return "√" if report.success else "×"


def _base_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    try:
        return runbook_base_url(value) if value else None
    except AlertsError as e:
        raise click.BadParameter(str(e)) from e


@click.command(epilog=EPILOG)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_store_path,
    show_default="$TRUSTMESH_HOME or ~/.local/share/trustmesh",
    help="The credential store holding the trust bundle and the issuer.",
)
@click.option("--identity", metavar="ADMIN_ADDR", help="Identity service admin HOST:PORT.")
@click.option("--destination", metavar="ADMIN_ADDR", help="Destination service admin HOST:PORT.")
@click.option(
    "--proxy",
    "proxies",
    multiple=True,
    metavar="ADMIN_ADDR",
    help="A proxy's admin HOST:PORT (repeatable).",
)
@admin_timeout_option
@click.option(
    "--runbook-base-url",
    "runbook_base",
    metavar="URL",
    envvar="TRUSTMESH_RUNBOOK_BASE_URL",
    callback=_base_url,
    help="Where the runbooks are published: hints become URL/runbooks/<Alert>.md "
    "(default: the runbook files of this installation).",
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def check(
    store: Path,
    identity: str | None,
    destination: str | None,
    proxies: tuple[str, ...],
    timeout: float,
    runbook_base: str | None,
    output: str,
) -> int:
    """Check the trust anchors and issuer, control-plane readiness and the proxies.

    Given no admin address, it checks those of a `trustmesh up` running on the store's home.

    Results: √ passed, ‼ warning, × failed; each failure names the runbook to follow.
    """
    links = RunbookLinks(runbook_base, RUNBOOKS_DIR if RUNBOOKS_DIR.is_dir() else None)
    names: dict[str, str] = {}  # proxy admin address -> workload, for discovered proxies
    if not (identity or destination or proxies):
        from trustmesh.up.home import running_mesh  # (imports identity: only when needed)

        running = running_mesh(store)
        if running is not None:
            click.echo(
                f"checking the mesh of the trustmesh up running on {store} (pid {running.pid})",
                err=True,
            )
            identity, destination = running.identity, running.destination
            names = running.proxies
            proxies = tuple(names)
    now = utcnow()
    state: StoreState | Exception
    pending_since = None
    try:
        state = FileStore(store).load()
    except (PKIError, OSError) as e:
        state = e
    if isinstance(state, StoreState) and state.pending_issuer_key is not None:
        with contextlib.suppress(PKIError, OSError):  # the current version changed meanwhile
            pending_since = FileStore(store).pending_issuer_key_since()
    categories: list[Category] = [identity_category(state, now, pending_since)]
    components = [
        (name, addr)
        for name, addr in (("identity", identity), ("destination", destination))
        if addr
    ]
    if components:
        issuer = state.issuer if isinstance(state, StoreState) else None
        categories.append(
            control_plane_category(
                [
                    (name, probe_admin(addr, timeout=timeout, metrics=name == "identity"))
                    for name, addr in components
                ],
                issuer.certificate.fingerprint if issuer is not None else None,
            )
        )
    if proxies:
        digest = state.bundle.digest if isinstance(state, StoreState) and state.bundle else None
        statuses = [
            named(probe_admin(p, timeout=timeout, metrics=True), names.get(p)) for p in proxies
        ]
        staged = state.next_anchor if isinstance(state, StoreState) else None
        categories.append(
            data_plane_category(
                statuses, digest, staged_anchor=staged.fingerprint if staged else None
            )
        )
    report = run(categories)
    if output == "json":
        click.echo(json.dumps(report.as_json(links), indent=2))
    else:
        _print(report, links)
    return 0 if report.success else 1
