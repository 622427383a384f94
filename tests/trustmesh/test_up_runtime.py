"""``up``'s run (``trustmesh.up.runtime.Mesh``): the ports it chooses, the issuer and anchors it
keeps current, and the processes it starts and stops as the mesh file changes."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import yaml

import trustmesh.up.runtime as runtime
from pki.certs import utcnow
from pki.rotation import init_anchor, issue_issuer
from pki.store import ANCHOR_KEY, FileStore
from proxy.settings import SHUTDOWN_GRACE
from trustmesh.supervisor import Supervisor, free_ports
from trustmesh.up.demo import demo_mesh
from trustmesh.up.home import ensure_pki
from trustmesh.up.plan import ControlPlane
from trustmesh.up.runtime import Mesh, UpOptions

# Below the ephemeral range, so no port picked by the kernel for someone else lands here.
NAMED = range(21000, 21040)


def test_ports_up_chooses_never_collide_with_ports_the_mesh_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh_file = tmp_path / "demo-mesh.yaml"
    mesh_file.write_text(demo_mesh(iter(NAMED)))
    # The demo mesh's ports were free a moment ago and released: a later pick of free ports
    # can return them. Here it does, first; before, identity's admin port once took an api
    # app's port (the app then died on 'address in use' while its readiness check, a TCP
    # accept, was answered by identity).
    monkeypatch.setattr(runtime, "free_ports", lambda n: list(range(NAMED.start, NAMED.start + n)))
    mesh = Mesh(UpOptions(mesh_file, tmp_path / "home"), Supervisor(tmp_path / "logs"))
    mesh.prepare()
    named = {p for plan in mesh.plans for p in (*plan.app_ports, plan.inbound_port)}
    named |= {p for plan in mesh.plans for p in (plan.admin_port, plan.outbound_port)}
    named |= {port for plan in mesh.plans for _, port, _ in plan.upstreams}
    assert len(named) == 28 and named <= set(NAMED)  # the demo names every port it uses
    control = set(mesh._control_ports)
    assert len(control) == 4 and not control & named
    assert not (tmp_path / "home" / "current").exists()  # prepare() creates nothing


def test_up_stops_proxies_before_their_applications_and_the_control_plane_last(
    tmp_path: Path,
) -> None:
    """The stop rounds (see test_supervisor): a proxy drains while its application still
    answers, and has its shutdown grace to do it before it is killed."""
    mesh_file = tmp_path / "demo-mesh.yaml"
    mesh_file.write_text(demo_mesh(iter(NAMED)))
    mesh = Mesh(UpOptions(mesh_file, tmp_path / "home"), Supervisor(tmp_path / "logs"))
    mesh.prepare()
    mesh.control = ControlPlane("127.0.0.1:1", "127.0.0.1:2")
    rounds: dict[str, set[tuple[int, float | None]]] = {}
    for plan in mesh.plans:
        for spec in mesh._workload_specs(plan):
            kind = spec.name.split("-", 1)[0]
            rounds.setdefault(kind, set()).add((spec.stop_order, spec.stop_timeout))
    assert rounds == {
        "proxy": {(runtime.STOP_PROXIES, SHUTDOWN_GRACE + runtime.PROXY_EXIT_MARGIN)},
        "app": {(runtime.STOP_APPS, None)},
    }
    assert runtime.STOP_PROXIES < runtime.STOP_APPS < runtime.STOP_CONTROL_PLANE


def test_a_running_up_renews_the_issuer_when_due(tmp_path: Path) -> None:
    # 'up' replaced an expired issuer only when it started; a mesh left up past the 48 h issuer
    # lost its CA. It now runs the rotation job itself, once a minute.
    home = tmp_path / "home"
    store = FileStore(home)
    start = utcnow()
    init_anchor(store, now=start - timedelta(hours=40), lifetime=timedelta(days=365))
    old = issue_issuer(store, now=start - timedelta(hours=40)).require_issuer().certificate
    mesh = Mesh(UpOptions(tmp_path / "unused.yaml", home), Supervisor(tmp_path / "logs"))
    (said,) = mesh.renew_issuer(start)  # 40 h of 48: past the renewal point
    new = store.issuer().certificate
    assert new != old and new.not_before <= start < new.not_after
    assert (
        said == f"issuer renewed: {new.fingerprint[:16]} until {new.not_after:%Y-%m-%d %H:%M} UTC"
    )
    assert mesh.renew_issuer(start + timedelta(seconds=30)) == []  # checked once a minute
    assert mesh.renew_issuer(start + runtime.ISSUER_CHECK) == []  # not due again
    assert store.issuer().certificate == new


def test_what_a_running_up_cannot_renew_is_said_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = FileStore(home)
    start = utcnow()
    init_anchor(store, now=start - timedelta(hours=40), lifetime=timedelta(days=365))
    issue_issuer(store, now=start - timedelta(hours=40))
    with store.lock():
        store.commit({ANCHOR_KEY: None}, reason="anchor key moved offline", now=start)
    mesh = Mesh(UpOptions(tmp_path / "unused.yaml", home), Supervisor(tmp_path / "logs"))
    (said,) = mesh.renew_issuer(start)
    assert said.startswith("action needed: the issuer is due") and "kept offline" in said
    assert mesh.renew_issuer(start + 2 * runtime.ISSUER_CHECK) == []  # not repeated
    # a 'trustmesh rotate' of the user's holds the store: that run does the work, nothing said
    fresh = Mesh(UpOptions(tmp_path / "unused.yaml", home), Supervisor(tmp_path / "logs"))
    with store.lock():
        assert fresh.renew_issuer(start) == []
    assert fresh.renew_issuer(start + runtime.ISSUER_CHECK) == [said]


def test_the_anchors_file_proxies_start_from_follows_the_store(tmp_path: Path) -> None:
    # 'up' wrote it once, at start; after an anchor rotation (and the old anchor's removal) a
    # proxy restarted by the supervisor would have trusted only the old anchor, and could not
    # have reached identity or destination again.
    home = tmp_path / "home"
    mesh = Mesh(UpOptions(tmp_path / "unused.yaml", home), Supervisor(tmp_path / "logs"))
    ensure_pki(mesh.home, now=utcnow())
    store = mesh.home.store
    assert mesh.home.anchors.read_bytes() == store.trust_bundle().pem()
    assert mesh.sync_trust_anchors() is None  # in step already
    issue_issuer(store, now=utcnow())  # a new store version, the same bundle
    assert mesh.sync_trust_anchors() is None
    staged = init_anchor(store, now=utcnow(), stage=True)
    said = mesh.sync_trust_anchors()
    assert said is not None and f"store version {staged.version}" in said
    assert mesh.home.anchors.read_bytes() == staged.require_bundle().pem()
    assert mesh.sync_trust_anchors() is None


def test_a_store_the_anchors_file_cannot_follow_is_said_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mesh = Mesh(UpOptions(tmp_path / "unused.yaml", home), Supervisor(tmp_path / "logs"))
    ensure_pki(mesh.home, now=utcnow())
    (home / "current").unlink()
    (home / "current").write_text("not a link")  # what a careless hand leaves behind
    said = mesh.sync_trust_anchors()
    assert said is not None and "cannot update" in said and "not a symlink" in said
    assert mesh.sync_trust_anchors() is None  # not again on every tick


def _app(name: str, port: int, command: str | None = None) -> dict:
    """An application-only workload (no proxy: this test runs no control plane)."""
    command = (
        command or f"{{python}} -m trustmesh.demo.apps http --name {name} --listen 127.0.0.1:{port}"
    )
    return {
        "apiVersion": "trustmesh.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": f"{name}-0", "namespace": "demo", "labels": {"app": name},
                     "annotations": {"up.trustmesh.io/command": command}},
        "spec": {"serviceAccount": name, "address": "127.0.0.1",
                 "ports": [{"name": "http", "port": port}]},
    }  # fmt: skip


def _answer(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(json.loads(r.read())["service"])


def test_a_running_up_follows_the_mesh_file(tmp_path: Path) -> None:
    # Destination applied a mesh file change at once, but up started processes only when it
    # started: a workload added to the file got endpoints and no process, and one removed
    # kept running. Now the processes follow the file.
    ports = free_ports(5)
    mesh_file = tmp_path / "mesh.yaml"
    stamp = iter(range(1, 100))
    supervisor = Supervisor(tmp_path / "logs")
    mesh = Mesh(UpOptions(mesh_file, tmp_path / "home", ready_timeout=20), supervisor)
    mesh.settle = 0.0  # act on each write at once (the settling is tested below)

    def write(docs: list[dict] | str) -> None:
        mesh_file.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
        t = next(stamp) * 10**9  # a new mtime whatever the clock's granularity
        os.utime(mesh_file, ns=(t, t))

    def settle(*keys: str) -> list[str]:
        """reconcile() until each workload in ``keys`` is ready or stopped; what it said."""
        said: list[str] = []
        for _ in range(400):  # 20 s
            said += mesh.reconcile()
            if not mesh._starting.keys() & set(keys):
                return said
            time.sleep(0.05)
        raise AssertionError(f"still starting: {mesh._starting}; said {said}")

    def pid(name: str) -> int:
        child = supervisor.child(name)
        assert child is not None, name
        return child.proc.pid

    write([_app("a", ports[0]), _app("b", ports[1])])
    try:
        mesh.prepare()
        mesh.control = ControlPlane("127.0.0.1:1", "127.0.0.1:2")
        mesh.start_workloads()
        assert mesh.reconcile() == []  # not touched: one stat, nothing said
        a_pid, b_pid = pid("app-demo-a-0"), pid("app-demo-b-0")
        generation = mesh.generation

        # Labels only: destination's business; no process changes.
        docs = [_app("a", ports[0]), _app("b", ports[1])]
        docs[0]["metadata"]["labels"]["tier"] = "front"
        write(docs)
        assert mesh.reconcile() == [
            "the mesh file changed; destination applies it (workloads unchanged)"
        ]
        assert pid("app-demo-a-0") == a_pid and mesh.generation == generation

        # b removed, c added, a's command changed.
        a2 = f"{{python}} -m trustmesh.demo.apps http --name a2 --listen 127.0.0.1:{ports[0]}"
        write([_app("a", ports[0], a2), _app("c", ports[2])])
        said = mesh.reconcile()
        assert said == [
            "the mesh file changed: workloads added demo/c-0; removed demo/b-0; changed demo/a-0",
            "stopped app-demo-a-0, app-demo-b-0",
            "starting workload demo/a-0",
            "starting workload demo/c-0",
        ]
        assert not psutil.pid_exists(b_pid) or psutil.Process(b_pid).status() == "zombie"
        assert supervisor.child("app-demo-b-0") is None
        assert sorted(settle("demo/a-0", "demo/c-0")) == [
            "workload demo/a-0 is ready",
            "workload demo/c-0 is ready",
        ]
        assert pid("app-demo-a-0") != a_pid
        assert _answer(ports[0]) == "a2" and _answer(ports[2]) == "c"
        assert [p.key for p in mesh.plans] == ["demo/a-0", "demo/c-0"]
        assert mesh.generation > generation
        # Ready, they are supervised like the rest: restarted when they exit.
        assert all(c.spec.restart for c in supervisor.children)

        # A new workload that exits while starting is stopped and said; the rest runs on.
        crash = "{python} -c 'import sys; print(\"no config\"); sys.exit(3)'"
        write([_app("a", ports[0], a2), _app("c", ports[2]), _app("d", ports[3], crash)])
        said = mesh.reconcile()
        assert said[-1] == "starting workload demo/d-0"
        said = settle("demo/d-0")
        assert len(said) == 1 and "app-demo-d-0 exited with status 3 while starting" in said[0]
        assert "| no config" in said[0]
        assert said[0].endswith("workload demo/d-0 is stopped; the rest of the mesh runs on")
        assert supervisor.child("app-demo-d-0") is None
        assert [p.key for p in mesh.plans] == ["demo/a-0", "demo/c-0"]

        # Fixed, it is started: a failed workload is retried on the next change that names it.
        # One whose port is taken is refused, naming the port, before anything is started.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", ports[4]))
            taken.listen()
            write(
                [_app("a", ports[0], a2), _app("c", ports[2]), _app("d", ports[3]),
                 _app("e", ports[4])]
            )  # fmt: skip
            said = mesh.reconcile()
            assert said == [
                "the mesh file changed: workloads added demo/d-0, demo/e-0",
                "starting workload demo/d-0",
                f"cannot start workload demo/e-0: 127.0.0.1:{ports[4]} (application port of "
                "demo/e-0) is already in use; stop what listens there or change the mesh "
                "file; the rest of the mesh runs on",
            ]
        assert settle("demo/d-0") == ["workload demo/d-0 is ready"]
        assert _answer(ports[3]) == "d"
        assert supervisor.child("app-demo-e-0") is None

        # A file with no resources (being written, or truncated) does not stop the mesh.
        write("# nothing yet\n")
        assert mesh.reconcile() == [
            f"the mesh file {mesh_file} has no resources (a file being written, or truncated by "
            "mistake, looks like this): up keeps its workloads running, and destination serves "
            "the last state"
        ]
        assert [p.key for p in mesh.plans] == ["demo/a-0", "demo/c-0", "demo/d-0"]
        assert _answer(ports[2]) == "c"

        # up acts on a file once it has stopped changing for ``settle`` seconds: a write in
        # progress (here c-0 not written yet) is not taken for c-0's removal.
        mesh.settle = 5.0
        write([_app("a", ports[0], a2)])
        t = time.monotonic()
        assert mesh.reconcile(t) == [] and mesh.reconcile(t + 4.9) == []
        write([_app("a", ports[0], a2), _app("c", ports[2]), _app("d", ports[3])])
        assert mesh.reconcile(t + 5.1) == []  # changed again: its 5 s start over
        assert mesh.reconcile(t + 10.2) == [
            "the mesh file changed; destination applies it (workloads unchanged)"
        ]
        mesh.settle = 0.0

        # A refused file changes nothing, and is said once.
        write("kind: [")
        (said,) = mesh.reconcile()
        assert said.startswith("the mesh file changed and is refused (") and said.endswith(
            "destination serves the last valid one"
        )
        write("kind: [")
        assert mesh.reconcile() == []
        # A resource refused (here a duplicate) is a refusal too, not an error that ends up.
        docs = [_app("a", ports[0], a2)]
        write([*docs, *docs])
        (said,) = mesh.reconcile()
        assert "duplicates document 1" in said and said.startswith("the mesh file changed and is")
        mesh_file.unlink()
        assert mesh.reconcile() == [
            f"the mesh file {mesh_file} is gone; destination serves its last state"
        ]
        assert _answer(ports[0]) == "a2" and _answer(ports[2]) == "c"
    finally:
        supervisor.stop()
