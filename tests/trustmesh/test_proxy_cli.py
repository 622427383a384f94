"""``trustmesh proxy run`` option checks: bad values are usage errors before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmesh.cli import cli
from trustmesh.errors import run_cli


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--head-timeout", "0"), ("--head-timeout", "-1"), ("--detect-timeout", "soon")],
)
def test_timeouts_must_be_positive_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    anchors, token = tmp_path / "anchors.pem", tmp_path / "token"
    anchors.write_text("")
    token.write_text("")
    args = ["proxy", "run", "--workload", "w-0", "--token-file", str(token),
            "--trust-anchors", str(anchors), flag, value]  # fmt: skip
    assert run_cli(cli, args) == 2
    assert f"Invalid value for '{flag}'" in capsys.readouterr().err
