"""Every alert has a runbook with the kube-prometheus sections, and every ``trustmesh ...``
command a runbook quotes exists with the options it uses (``--help`` succeeds)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from alerts.rulebook import load_rules
from trustmesh.cli import cli

RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"
SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation")
INLINE = re.compile(r"`(trustmesh [^`]+)`")


def _commands(text: str) -> list[str]:
    found = [m.group(1) for m in INLINE.finditer(text)]
    in_block = False
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
        elif in_block and line.strip().startswith("trustmesh "):
            found.append(line.strip())
    return found


def _resolve(command: str) -> list[str]:
    """The sub-command path of ``command``; asserts each option exists where it is used."""
    tokens = shlex.split(re.split(r"\s(?:\||&&|;|#)\s", command)[0])[1:]
    current: click.Command = cli
    path: list[str] = []
    ctx = click.Context(cli)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name = token.split("=")[0]
            option = next((p for p in current.params if name in getattr(p, "opts", ())), None)
            assert option is not None, (
                f"{command!r}: {' '.join(path) or 'trustmesh'} has no option {name}"
            )
            if isinstance(option, click.Option) and not option.is_flag and "=" not in token:
                i += 1
        elif isinstance(current, click.Group):
            sub = current.get_command(ctx, token)
            assert sub is not None, (
                f"{command!r}: no command 'trustmesh {' '.join([*path, token])}'"
            )
            current = sub
            path.append(token)
        i += 1
    return path


def test_every_alert_has_a_runbook_with_the_four_sections() -> None:
    for name in load_rules():
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        positions = [text.find(section) for section in SECTIONS]
        assert all(p > 0 for p in positions) and positions == sorted(positions), name
        assert _commands(text), f"{name}.md quotes no trustmesh command"


def test_no_runbook_without_an_alert() -> None:
    assert {p.stem for p in RUNBOOKS.glob("*.md")} == set(load_rules())


@pytest.mark.parametrize(
    "command",
    sorted({c for p in RUNBOOKS.glob("*.md") for c in _commands(p.read_text())}),
)
def test_quoted_commands_exist(command: str) -> None:
    path = _resolve(command)
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output


def test_the_resolver_rejects_what_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="no command"):
        _resolve("trustmesh alerts frobnicate")
    with pytest.raises(AssertionError, match="no option"):
        _resolve("trustmesh alerts check --no-such-flag")
