"""``trustmesh up`` when things go wrong, as an on-call engineer meets it: a port already in use,
a bad mesh file, a home another ``up`` holds, a signal just as the mesh becomes ready, a child in
a crash loop. Each run is the real command with real children, and none may be left behind."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from trustmesh.commands.up import demo, up
from trustmesh.supervisor import Supervisor, free_ports
from trustmesh.up.home import Home

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
PY = "{python} -m trustmesh.demo.apps"


def _workload(name: str, annotations: dict[str, str], spec: dict) -> dict:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name[:-2]},
                     "annotations": annotations},
        "spec": {"address": "127.0.0.1", **spec},
    }  # fmt: skip


def _small_mesh(tmp_path: Path, web_app: int, web_in: int, shell_in: int, upstream: int) -> Path:
    """web-0 (app + proxy) and shell-0 (a proxy whose upstream listener reaches web)."""
    docs = [
        _workload(
            "web-0",
            {"up.trustmesh.io/command": f"{PY} http --name web --listen 127.0.0.1:{web_app}"},
            {"serviceAccount": "web", "inboundProxyPort": web_in,
             "ports": [{"name": "http", "port": web_app}]},
        ),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}},
        _workload(
            "shell-0",
            {"up.trustmesh.io/upstreams": f"127.0.0.1:{upstream}=web.shop.svc.cluster.local:80"},
            {"serviceAccount": "shell", "inboundProxyPort": shell_in},
        ),
    ]  # fmt: skip
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "TRUSTMESH_HOME": str(home)}


def _run_up(home: Path, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", "up", *args],
        cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("which", "what"),
    [
        ("inbound", "proxy inbound port of shop/web-0"),
        ("app", "application port of shop/web-0"),
        ("upstream", "upstream listener of shop/shell-0 for web.shop.svc.cluster.local:80"),
    ],
)
def test_a_port_in_use_is_refused_naming_it_before_anything_starts(
    tmp_path: Path, which: str, what: str
) -> None:
    web_app, web_in, shell_in, upstream = free_ports(4)
    mesh = _small_mesh(tmp_path, web_app, web_in, shell_in, upstream)
    busy_port = {"inbound": web_in, "app": web_app, "upstream": upstream}[which]
    home = tmp_path / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen()
        # Without the check, an application's port taken by another listener passed for the
        # application's readiness: 'mesh ready', then a crash loop.
        done = _run_up(home, "--mesh-file", str(mesh), "--duration", "2")
    assert done.returncode == 1, done.stderr
    assert f"error: 127.0.0.1:{busy_port} ({what}) is already in use" in done.stderr
    assert not (home / "current").exists()  # refused before the PKI was created


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not text", "mesh.yaml: not UTF-8 text"),
        (
            yaml.safe_dump(
                _workload(
                    "web-0",
                    {"up.trustmesh.io/admin-port": "99999"},
                    {"serviceAccount": "web", "inboundProxyPort": 14143},
                )
            ).encode(),
            "mesh.yaml: workload shop/web-0: annotation up.trustmesh.io/admin-port '99999' "
            "is not a port number",
        ),
    ],
)
def test_an_invalid_mesh_file_is_exit_3_before_the_pki(
    tmp_path: Path, content: bytes, message: str
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes(content)
    home = tmp_path / "home"
    done = _run_up(home, "--mesh-file", str(mesh), "--duration", "1")
    assert done.returncode == 3, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (home / "current").exists()


def test_a_second_up_on_a_held_home_refuses_and_touches_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    with home.run_lock():  # as a running 'up' holds it
        done = _run_up(home.root, "--duration", "1")
    assert done.returncode == 1, done.stderr
    assert f"another trustmesh up (pid {os.getpid()}) is running on {home.root}" in done.stderr
    # The first one's destination watches this file: a second 'up' rewrote it with its ports.
    assert not (home.run_dir / "demo-mesh.yaml").exists()
    assert not (home.root / "current").exists()


def _read_stderr_until(proc: subprocess.Popen[str], text: str, timeout: float) -> None:
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stderr.readline()
            seen += line
            if text in line:
                return
        assert proc.poll() is None, f"up exited {proc.returncode}: {seen}"
    raise AssertionError(f"no {text!r} within {timeout}s: {seen}")


def _processes_of(home: Path, within: float) -> list[str]:
    """Command lines of processes still running with ``TRUSTMESH_HOME=home`` after ``within``
    seconds (every child of that 'up' inherits it)."""
    deadline = time.monotonic() + within
    while True:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("TRUSTMESH_HOME") == str(home):
                    found.append(" ".join(p.cmdline()))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_as_the_mesh_becomes_ready_stops_it_cleanly(tmp_path: Path, signum: int) -> None:
    mesh = _small_mesh(tmp_path, *free_ports(4))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "up", "--mesh-file", str(mesh)],
        cwd=ROOT, env=_env(tmp_path / "home"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _read_stderr_until(proc, "mesh ready", 30)
        # At once: SIGTERM used to find its default action here (up killed, no stop, no
        # summary) and SIGINT a KeyboardInterrupt outside any handler.
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "trustmesh up — final" in out and "Traceback" not in err
        assert _processes_of(tmp_path / "home", within=5) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_a_child_in_a_crash_loop_stops_up_naming_it(tmp_path: Path, monkeypatch) -> None:
    # One restart instead of five keeps the test short; the policy is the supervisor's (tested
    # in test_supervisor.py), this checks what 'up' does when the supervisor gives up.
    monkeypatch.setattr(Supervisor, "MAX_RESTARTS", 1)
    mesh = tmp_path / "mesh.yaml"
    crash = "{python} -c \"print('cannot open the database'); raise SystemExit(4)\""
    mesh.write_text(
        yaml.safe_dump(
            _workload("db-0", {"up.trustmesh.io/command": crash}, {"serviceAccount": "db"})
        )
    )
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = CliRunner().invoke(
        up, ["--mesh-file", str(mesh), "--duration", "30", "-o", "json"],
        env={"TRUSTMESH_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "error: app-shop-db-0 exited with status 4 after 1 restarts in a row" in result.stderr
    assert "| cannot open the database" in result.stderr
    assert '"child_failure": "app-shop-db-0 exited with status 4' in result.stdout
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.parametrize("duration", ["nan", "inf", "0", "-1"])
def test_a_duration_that_is_not_a_finite_positive_number_is_a_usage_error(duration: str) -> None:
    result = CliRunner().invoke(demo, ["--duration", duration])
    assert result.exit_code == 2 and "--duration" in result.output
