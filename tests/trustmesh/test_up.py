"""``trustmesh up --mesh-file FILE`` as a process: starts the control plane and the workloads of
the file (apps from their ``up.trustmesh.io/command``), serves traffic, and stops every child
cleanly on SIGTERM."""

from __future__ import annotations

import copy
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import yaml

from pki.certs import utcnow
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore
from trustmesh.supervisor import free_ports

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _mesh(web_app: int, web_in: int, client_in: int, upstream: int) -> list[dict]:
    py = "{python} -m trustmesh.demo.apps"
    return [
        {"apiVersion": "trustmesh.io/v1alpha1", "kind": "Workload",
         "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                      "annotations": {"up.trustmesh.io/command":
                                      f"{py} http --name web --listen 127.0.0.1:{web_app}"}},
         "spec": {"serviceAccount": "web", "address": "127.0.0.1", "inboundProxyPort": web_in,
                  "ports": [{"name": "http", "port": web_app}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}},
        {"apiVersion": "trustmesh.io/v1alpha1", "kind": "Workload",
         "metadata": {"name": "shell-0", "namespace": "shop", "annotations": {
             "up.trustmesh.io/upstreams": f"127.0.0.1:{upstream}=web.shop.svc.cluster.local:80"}},
         "spec": {"serviceAccount": "shell", "address": "127.0.0.1", "inboundProxyPort": client_in}},
    ]  # fmt: skip


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            return proc.stdout.readline()
        assert proc.poll() is None, f"trustmesh up exited with {proc.returncode}"
    raise AssertionError(f"trustmesh up printed nothing within {timeout}s")


def _mesh_file(tmp_path: Path) -> tuple[Path, int]:
    """The two-workload mesh file on free ports; returns it and shell-0's upstream port."""
    web_app, web_in, client_in, upstream = free_ports(4)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump_all(_mesh(web_app, web_in, client_in, upstream)))
    return mesh_file, upstream


def _start_up(mesh_file: Path, home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "up", "--mesh-file", str(mesh_file), "-o", "json"],
        cwd=ROOT, env={**os.environ, "TRUSTMESH_HOME": str(home)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _start_exporter(home: Path) -> tuple[subprocess.Popen[str], int]:
    """``trustmesh alerts exporter`` on the home, told nothing else; returns it and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh", "alerts", "exporter", "--listen", "127.0.0.1:0",
         "--interval", "1s"],
        cwd=ROOT, env={**os.environ, "TRUSTMESH_HOME": str(home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    said = ""
    while time.monotonic() < deadline and sel.select(timeout=deadline - time.monotonic()):
        line = proc.stderr.readline()
        said += line
        if line.startswith("serving http://127.0.0.1:"):
            return proc, int(line.rsplit(":", 1)[1].split("/")[0])
        if not line:
            break
    proc.kill()
    raise AssertionError(f"the exporter did not start: {said}")


def _sources_up(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        line.split('source="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trustmesh_cert_source_up{")
    }


def _wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_up_runs_a_mesh_file_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    mesh_file, upstream = _mesh_file(tmp_path)
    home = tmp_path / "home"
    proc = _start_up(mesh_file, home)
    exporter: subprocess.Popen[str] | None = None
    try:
        info = json.loads(_read_line(proc, 60))
        assert info["ready"] is True
        workloads = {w["workload"]: w for w in info["workloads"]}
        assert workloads["shop/shell-0"]["upstreams"] == {
            "web.shop.svc.cluster.local:80": f"127.0.0.1:{upstream}"
        }
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 5  # identity, destination, web app, two proxies
        with urllib.request.urlopen(f"http://127.0.0.1:{upstream}/", timeout=10) as r:
            answer = json.loads(r.read())
        assert answer == {
            "service": "web",
            "client": "shell.shop.serviceaccount.identity.trustmesh.cluster.local",
        }
        token = home / "up" / "tokens" / "shop.web.jwt"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        # 'trustmesh check' on the same home, told nothing else, checks this mesh's components.
        checked = subprocess.run(
            [sys.executable, "-m", "trustmesh", "check", "-o", "json"],
            cwd=ROOT, env={**os.environ, "TRUSTMESH_HOME": str(home)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"(pid {proc.pid})" in checked.stderr
        report = json.loads(checked.stdout)
        names = [c["categoryName"] for c in report["categories"]]
        assert names == [
            "trustmesh-identity",
            "trustmesh-control-plane",
            "trustmesh-identity-data-plane",
        ]
        control = {c["description"]: c["result"] for c in report["categories"][1]["checks"]}
        assert control["identity service signs with the store's issuer"] == "success"
        # So does 'alerts check' (cron): the store, and each proxy's workload certificate.
        alerts = subprocess.run(
            [sys.executable, "-m", "trustmesh", "alerts", "check", "-o", "json"],
            cwd=ROOT, env={**os.environ, "TRUSTMESH_HOME": str(home)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert alerts.returncode == 0, alerts.stdout + alerts.stderr
        assert f"watching the 2 proxies of the trustmesh up running on {home}" in alerts.stderr
        watched = {
            (c["source"].split(":")[0], c["role"])
            for c in json.loads(alerts.stdout)["certificates"]
        }
        assert ("proxy", "workload") in watched and ("store", "issuer") in watched
        assert not json.loads(alerts.stdout)["errors"]
        # The exporter (it runs for days) looks for the running up's proxies at every scan.
        exporter, port = _start_exporter(home)
        admins = {w["admin"] for w in info["workloads"]}
        _wait_for(lambda: {f"proxy:{a}" for a in admins} <= set(_sources_up(port)))
        assert all(v == 1.0 for v in _sources_up(port).values())
        published = home / "up" / "mesh.json"
        assert oct(published.stat().st_mode & 0o777) == "0o644"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not published.exists()
        summary = json.loads(out)
        assert summary["tls_groups"] == {"X25519MLKEM768": 1}
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.pid for p in alive]
        # The up is gone: so are its proxies from the exporter's scans; the store stays.
        _wait_for(lambda: set(_sources_up(port)) == {f"store:{home.resolve()}"})
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.communicate(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def _issuer_not_after(admin: str) -> float:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("identity_issuer_not_after_timestamp_seconds "):
            return float(line.split()[1])
    raise AssertionError("identity publishes no issuer NotAfter")


def test_a_running_up_renews_a_due_issuer_and_identity_takes_it(tmp_path: Path) -> None:
    mesh_file, upstream = _mesh_file(tmp_path)
    home = tmp_path / "home"
    store = FileStore(home)
    made = utcnow() - timedelta(hours=40)  # a 48 h issuer 40 h old: valid, and due
    init_anchor(store, now=made, lifetime=timedelta(days=365))
    old = issue_issuer(store, now=made).require_issuer().certificate
    proc = _start_up(mesh_file, home)
    try:
        info = json.loads(_read_line(proc, 60))
        identity_admin = info["control_plane"]["admin"]["identity"]
        deadline = time.monotonic() + 30
        while store.issuer().certificate == old:
            assert time.monotonic() < deadline, "up did not renew the due issuer"
            time.sleep(0.2)
        new = store.issuer().certificate
        while _issuer_not_after(identity_admin) != new.not_after.timestamp():
            assert time.monotonic() < deadline, "identity did not load the renewed issuer"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{upstream}/", timeout=10) as r:
            assert json.loads(r.read())["service"] == "web"
        # a staged anchor reaches the anchors file a restarted proxy would start from
        bundle = init_anchor(store, now=utcnow(), stage=True).require_bundle().pem()
        anchors = home / "up" / "trust-anchors.pem"
        while anchors.read_bytes() != bundle:
            assert time.monotonic() < deadline + 10, "the anchors file did not follow the store"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"issuer renewed: {new.fingerprint[:16]}" in err
        assert "trust anchors file updated from store version" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def _replace(path: Path, text: str) -> None:
    """Write ``path`` atomically, as the README asks of mesh file edits."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _service_via(upstream: int) -> str | None:
    """The service that answered through an upstream listener; None: no answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{upstream}/", timeout=10) as r:
            return str(json.loads(r.read())["service"])
    except OSError:  # urllib's errors included: not listening yet, 502/503 while it changes
        return None


def test_a_running_up_starts_and_stops_workloads_as_the_mesh_file_changes(
    tmp_path: Path,
) -> None:
    web_app, web_in, client_in, upstream = free_ports(4)
    web1_app, web1_in, upstream2 = free_ports(3)
    docs = _mesh(web_app, web_in, client_in, upstream)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump_all(docs))
    home = tmp_path / "home"
    published = home / "up" / "mesh.json"
    proc = _start_up(mesh_file, home)
    try:
        info = json.loads(_read_line(proc, 60))
        before = {w["workload"]: w for w in info["workloads"]}
        children = {p.pid: p for p in psutil.Process(proc.pid).children()}
        control_pids = {
            pid for pid, p in children.items() if {"identity", "destination"} & set(p.cmdline())
        }
        assert _service_via(upstream) == "web"

        # A second web replica (application and proxy), a new service account.
        web1 = copy.deepcopy(docs[0])
        web1["metadata"]["name"] = "web-1"
        web1["metadata"]["annotations"]["up.trustmesh.io/command"] = (
            f"{{python}} -m trustmesh.demo.apps http --name web1 --listen 127.0.0.1:{web1_app}"
        )
        web1["spec"].update(
            serviceAccount="web1", inboundProxyPort=web1_in,
            ports=[{"name": "http", "port": web1_app}],
        )  # fmt: skip
        _replace(mesh_file, yaml.safe_dump_all([*docs, web1]))

        def ready(key: str) -> bool:
            admin = {w["workload"]: w["admin"] for w in json.loads(published.read_text())[
                "workloads"]}.get(key)  # fmt: skip
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=5) as r:
                    return admin is not None and r.status == 200
            except OSError:
                return False

        _wait_for(lambda: ready("shop/web-1"), 40)
        workloads = {w["workload"] for w in json.loads(published.read_text())["workloads"]}
        assert workloads == {"shop/web-0", "shop/shell-0", "shop/web-1"}
        token = home / "up" / "tokens" / "shop.web1.jwt"
        assert oct(token.stat().st_mode & 0o777) == "0o600"

        # web-0 removed, shell-0 given a second upstream: web-0's processes stop, shell-0's
        # proxy is restarted on the admin port up chose for it, and its app-less peer stays.
        shell = copy.deepcopy(docs[2])
        shell["metadata"]["annotations"]["up.trustmesh.io/upstreams"] += (
            f",127.0.0.1:{upstream2}=web.shop.svc.cluster.local:80"
        )
        web0 = [
            p for p in children.values() if "web-0" in " ".join(p.cmdline()) or
            f"127.0.0.1:{web_app}" in " ".join(p.cmdline())
        ]  # fmt: skip
        assert len(web0) == 2
        _replace(mesh_file, yaml.safe_dump_all([docs[1], shell, web1]))
        _, alive = psutil.wait_procs(web0, timeout=20)
        assert not alive
        _wait_for(lambda: all(_service_via(upstream2) == "web1" for _ in range(5)), 40)
        assert _service_via(upstream) == "web1"
        after = {w["workload"]: w for w in json.loads(published.read_text())["workloads"]}
        assert set(after) == {"shop/shell-0", "shop/web-1"}
        assert after["shop/shell-0"]["admin"] == before["shop/shell-0"]["admin"]
        control = [p for p in children.values() if p.pid in control_pids]
        assert len(control) == 2 and all(p.is_running() for p in control)  # they stay

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        err = " ".join(err.split())  # rich wraps long lines on a pipe
        assert "workloads added shop/web-1" in err and "workload shop/web-1 is ready" in err
        assert "workloads removed shop/web-0; changed shop/shell-0" in err
        assert "stopped app-shop-web-0, proxy-shop-shell-0, proxy-shop-web-0" in err
        # stdout: after the ready line, one "changed" line per change of the running workloads
        # (JSON lines, each the whole mesh), then the summary.
        *changes, summary = [json.loads(line) for line in out.splitlines()]
        assert info["event"] == "ready" and changes
        assert {c["event"] for c in changes} == {"changed"}
        assert {w["workload"] for w in changes[-1]["workloads"]} == {"shop/shell-0", "shop/web-1"}
        assert {w["workload"] for w in summary["workloads"]} == {
            "shop/shell-0",
            "shop/web-1",
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
