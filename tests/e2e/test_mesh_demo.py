"""``trustmesh demo --duration 8 -o json`` as a user runs it: the whole embedded mesh (local PKI,
identity and destination with TLS, six proxies, five apps), real traffic, a JSON verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def run_demo(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``trustmesh demo ARGS`` with its own TRUSTMESH_HOME, to the end; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "trustmesh", "demo", *args],
        cwd=ROOT,
        env={**os.environ, "TRUSTMESH_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc


def test_demo_runs_every_request_over_hybrid_mesh_tls(tmp_path: Path) -> None:
    proc = run_demo(tmp_path / "home", "--duration", "8", "-o", "json")
    summary = json.loads(proc.stdout)
    assert summary["requests"] > 0 and summary["failures"] == 0, summary["errors"]
    groups = summary["tls_groups"]
    assert list(groups) == ["X25519MLKEM768"] and groups["X25519MLKEM768"] > 0
    assert summary["handshake_failures"] == 0
    assert summary["http"]["requests"] > 0 and summary["tcp"]["sessions"] > 0
    # Both api replicas took a share of the requests (balancing across endpoints).
    assert set(summary["http"]["api_replicas"]) == {"api-0", "api-1"}
    rows = {r["workload"]: r for r in summary["workloads"]}
    assert len(rows) == 6 and all(r["up"] for r in rows.values())
    assert (
        rows["demo/web-0"]["identity"] == "web.demo.serviceaccount.identity.trustmesh.cluster.local"
    )
    assert rows["demo/quote-0"]["success_rate"] == 1.0
    assert 0 < rows["demo/echo-0"]["cert_expires_in_seconds"] <= 24 * 3600 + 60
    # The PKI was created in the home on this first run, with the issuer key private.
    store = tmp_path / "home"
    assert (store / "current").is_symlink()
    assert oct((store / "current" / "issuer.key").stat().st_mode & 0o777) == "0o600"


def test_demo_table_output_into_a_pipe_is_one_final_table(tmp_path: Path) -> None:
    """Not a terminal (a CI log, ``| tee``): no live frames, just the final table and verdict."""
    proc = run_demo(tmp_path / "home", "--duration", "3", COLUMNS="100")
    lines = proc.stdout.splitlines()
    titles = [line.strip() for line in lines if "trustmesh demo —" in line]
    assert titles == ["trustmesh demo — final"], proc.stdout
    assert sum(line.lstrip().startswith("web-0 ") for line in lines) == 1, proc.stdout
    assert "every request succeeded" in proc.stdout
