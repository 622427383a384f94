"""The ``trustmesh`` command line.

Sub-command groups live in ``trustmesh/commands/<name>.py`` and are imported only when used, so
``trustmesh rotate`` from cron does not pay for gRPC or the proxy. Errors from the packages'
error trees become one line on stderr and a non-zero exit at this boundary.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Any

import click

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, tuple[str, str]] = {
    "pki": ("trustmesh.commands.pki:pki", "Manage trust anchors, issuers, bundles and leaves."),
    "rotate": ("trustmesh.commands.rotate:rotate", "Renew the issuer when due (the cron job)."),
    "identity": ("trustmesh.commands.identity:identity", "Run and use the identity service."),
    "destination": (
        "trustmesh.commands.destination:destination",
        "Run the destination (discovery and policy) service.",
    ),
    "proxy": ("trustmesh.commands.proxy:proxy", "Run the sidecar proxy."),
    "alerts": (
        "trustmesh.commands.alerts:alerts",
        "Expiry exporter and cron-friendly alert checks.",
    ),
    "check": (
        "trustmesh.commands.check:check",
        "Health checks of the PKI, control plane and proxies.",
    ),
    "up": ("trustmesh.commands.up:up", "Run the embedded mesh (control plane and proxies)."),
    "demo": (
        "trustmesh.commands.up:demo",
        "Run the embedded mesh on a demo app and drive traffic.",
    ),
}


def _available(name: str) -> bool:
    module = COMMANDS[name][0].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if _available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attr} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trustmesh")
def cli() -> None:
    """TrustMesh: certificate and identity lifecycle with an embedded post-quantum service mesh."""


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    from trustmesh.errors import run_cli

    # Public CA bundles hold a few certificates with a zero or negative serial; cryptography
    # warns on each as it parses them (a Python warning on the user's terminal). Adding such
    # an anchor is refused by name ('pki bundle add'); watching one for expiry is fine.
    warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")

    code = run_cli(cli, argv if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code
