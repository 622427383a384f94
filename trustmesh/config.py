"""Configuration shared by the CLI commands: where the credential store lives by default, and
how durations given as options are read.

The default store is ``$TRUSTMESH_HOME`` when set, else ``~/.local/share/trustmesh`` (the XDG
data directory convention), so ``trustmesh pki`` and ``trustmesh rotate`` find the same store
without flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import click

from pki.durations import parse_duration
from pki.errors import InvalidDuration

ENV_HOME = "TRUSTMESH_HOME"


def default_store_path(environ: Mapping[str, str] | None = None) -> Path:
    """The store directory used when ``--store`` is not given.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping.
    """
    env = os.environ if environ is None else environ
    home = env.get(ENV_HOME, "").strip()
    if home:
        return Path(home).expanduser()
    return Path(env.get("HOME") or Path.home()).expanduser() / ".local" / "share" / "trustmesh"


def duration_option(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> timedelta | None:
    """A click callback: ``90s``, ``24h``, ``30d`` as a timedelta; a usage error otherwise."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except InvalidDuration as e:
        raise click.BadParameter(str(e)) from None


# Seconds per HTTP request to an admin endpoint (check, pki anchor activate).
admin_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=300),
    default=3.0,
    show_default=True,
    help="Seconds per HTTP request.",
)
