"""Preparing ``up``'s run (``trustmesh.up.runtime.Mesh.prepare``): the ports it chooses."""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

import trustmesh.up.runtime as runtime
from pki.certs import utcnow
from pki.rotation import init_anchor, issue_issuer
from pki.store import ANCHOR_KEY, FileStore
from trustmesh.supervisor import Supervisor
from trustmesh.up.demo import demo_mesh
from trustmesh.up.home import ensure_pki
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


def test_a_changed_mesh_file_is_said_with_the_workloads_up_would_have_to_restart(
    tmp_path: Path,
) -> None:
    # Destination applies a mesh file change at once, but up starts processes only when it
    # starts: a workload added to the file got endpoints and no process, and nothing said so.
    mesh_file = tmp_path / "mesh.yaml"
    docs = list(yaml.safe_load_all(demo_mesh(iter(NAMED))))
    mesh_file.write_text(yaml.safe_dump_all(docs))
    mesh = Mesh(UpOptions(mesh_file, tmp_path / "home"), Supervisor(tmp_path / "logs"))
    mesh.prepare()
    stamp = iter(range(1, 100))

    def write(text: str) -> list[str]:
        mesh_file.write_text(text)
        t = next(stamp) * 10**9  # a new mtime whatever the clock's granularity
        os.utime(mesh_file, ns=(t, t))
        return mesh.mesh_file_changes()

    assert mesh.mesh_file_changes() == []  # not touched: one stat, nothing said
    assert write(yaml.safe_dump_all(docs)) == [
        "the mesh file changed; destination applies it (workloads unchanged)"
    ]
    extra = copy.deepcopy(docs[0])
    extra["metadata"]["name"] = "web-9"
    changed = copy.deepcopy(docs)
    changed[1]["metadata"]["annotations"]["up.trustmesh.io/command"] += " --extra"
    # web-0 renamed web-9, echo-0 dropped, api-0's command changed
    assert write(yaml.safe_dump_all([extra, *changed[1:4], *changed[5:]])) == [
        "the mesh file changed: workloads added demo/web-9; removed demo/echo-0, demo/web-0; "
        "changed demo/api-0. Destination applies it now, but up starts and stops processes "
        "only when it starts: restart up for them"
    ]
    (said,) = write("kind: [")
    assert said.startswith("the mesh file changed and is refused (") and said.endswith(
        "destination serves the last valid one"
    )
    assert write("kind: [") == []  # the same refusal is said once
    # A resource refused (here a duplicate) is a refusal too, not an error that ends up.
    (said,) = write(yaml.safe_dump_all([docs[0], docs[0]]))
    assert "duplicates document 1" in said and said.startswith("the mesh file changed and is")
    mesh_file.unlink()
    assert mesh.mesh_file_changes() == [
        f"the mesh file {mesh_file} is gone; destination serves its last state"
    ]
