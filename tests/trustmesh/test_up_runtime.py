"""Preparing ``up``'s run (``trustmesh.up.runtime.Mesh.prepare``): the ports it chooses."""

from __future__ import annotations

from pathlib import Path

import pytest

import trustmesh.up.runtime as runtime
from trustmesh.supervisor import Supervisor
from trustmesh.up.demo import demo_mesh
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
