"""The long benchmarks answer --help at once and refuse unknown arguments instead of running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    ("script", "mentions"),
    [("proxy_http1.py", "BENCH_SECONDS"), ("identity_certify.py", "QUICK=1")],
)
def test_help_describes_the_run_and_a_typo_starts_nothing(script: str, mentions: str) -> None:
    path = str(BENCHMARKS / script)
    shown = subprocess.run(
        [sys.executable, path, "--help"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "side by side" in shown.stdout or "beside" in shown.stdout
    assert mentions in shown.stdout
    typo = subprocess.run(
        [sys.executable, path, "--duraton", "5"], capture_output=True, text=True, timeout=60
    )
    assert typo.returncode == 2
    assert "unrecognized arguments: --duraton 5" in typo.stderr
