"""The long benchmarks answer --help at once and refuse unknown arguments instead of running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    ("script", "mentions"),
    [
        ("proxy_http1.py", "BENCH_SECONDS"),
        ("identity_certify.py", "QUICK=1"),
        ("proxy_memory.py", "--seconds"),
        ("lite_decode.py", "--endpoints"),
    ],
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


def test_sigterm_stops_every_process_the_proxy_benchmark_started() -> None:
    # `timeout` ends a run with SIGTERM; the backend, the proxies and haproxy must not outlive
    # it (they would hold ports and CPU into the next measurement).
    temp = Path(tempfile.gettempdir())
    dirs_before = set(temp.glob("tm-bench-*"))
    env = {**os.environ, "BENCH_SECONDS": "1", "BENCH_ROUNDS": "1"}
    bench = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "proxy_http1.py")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        parent = psutil.Process(bench.pid)
        # the backend, two haproxy pairs' processes and two proxies: wait for all five
        while len(started) < 5:
            assert time.monotonic() < deadline, f"only {len(started)} children started"
            assert bench.poll() is None, "the benchmark ended before it started its servers"
            started |= {c.pid for c in parent.children(recursive=True)}
            time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 143
        left = [pid for pid in started if _running(pid)]
        assert left == [], f"still running after SIGTERM: {left}"
        assert set(temp.glob("tm-bench-*")) <= dirs_before, "its temporary directory is left"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
