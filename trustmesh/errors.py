"""The CLI boundary: every known error becomes one line on stderr and an exit code."""

from __future__ import annotations

from collections.abc import Sequence

import click

from pki.errors import PKIError
from trustmesh.outcome import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, os_error

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CLIError", "os_error", "run_cli"]


class CLIError(click.ClickException):
    """An error to report as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: object | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def run_cli(command: click.Command, argv: Sequence[str]) -> int:
    """Run ``command``; map PKI and OS errors to a one-line message and exit status."""
    try:
        rv = command.main(args=list(argv), prog_name="trustmesh", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        if isinstance(e, click.UsageError):
            e.show()
            return EXIT_USAGE
        e.show()
        return e.exit_code
    except PKIError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILURE
    except OSError as e:
        click.echo(f"error: {os_error(e)}", err=True)
        return EXIT_FAILURE
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else EXIT_OK
