"""A trust-anchor rotation under a running ``trustmesh proxy run`` (one step, ``--rotate``, and two,
``--staged`` then ``activate``): the new anchor reaches the proxy through destination's
trust-bundle stream, the destination service restarts with a
certificate chaining only to the new anchor, and the proxy reconnects and keeps receiving
updates (before the fix its channel kept the startup anchors and was refused forever)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mesh_testkit import HOST, MeshKit, eventually, fixture_kit, metric

from pki.certs import utcnow
from pki.errors import PKIError
from pki.rotation import activate_anchor, init_anchor, issue_issuer
from pki.verify import verify_chain

pytestmark = [pytest.mark.timeout(120)]

NS = "rotate"
ECHO = f"echo.{NS}.svc.cluster.local:7000"


def workload(name: str, inbound: int, address: str = HOST, **labels: str) -> dict[str, object]:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"serviceAccount": name.rsplit("-", 1)[0], "address": address,
                 "inboundProxyPort": inbound, "ports": [{"name": "echo", "port": 7000}]},
    }  # fmt: skip


SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "echo", "namespace": NS},
    "spec": {"selector": {"app": "echo"}, "ports": [{"port": 7000, "targetPort": "echo"}]},
}


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[MeshKit]:
    yield from fixture_kit(tmp_path / "home")


@pytest.mark.parametrize("staged", [False, True], ids=["rotate", "staged-then-activate"])
def test_proxy_reconnects_to_destination_reissued_under_a_new_anchor(
    kit: MeshKit, tmp_path: Path, staged: bool
) -> None:
    proxy = kit.proxy_ports(ECHO)
    echo_ports = kit.ports(2)
    mesh = tmp_path / "mesh.yaml"
    docs = [workload("client-0", proxy.inbound), workload("echo-0", echo_ports[0], app="echo")]
    mesh.write_text(yaml.safe_dump_all([*docs, SERVICE]))
    with kit.together():
        kit.start_identity()
        kit.start_destination(mesh)
    kit.start_proxy("client-0", NS, "client", proxy)
    admin = proxy.admin_addr
    store = kit.home.store
    old = store.trust_bundle()

    def updates() -> float:
        return metric(admin, "trustmesh_destination_client_updates_total", stream="destination")

    # 1. A new anchor beside the old one: streamed to the proxy, whose channel moves to it.
    #    Staged, it signs nothing yet: the issuer still chains to the old anchor.
    init_anchor(store, now=utcnow(), rotate=not staged, stage=staged)
    if staged:
        issuer = store.issuer()
        verify_chain(issuer.certificate, issuer.chain, old, at=utcnow())
    eventually(
        lambda: metric(admin, "trustmesh_destination_client_channel_rebuilds_total") == 1,
        15,
        "the proxy's destination channel rebuilt for the two-anchor bundle",
    )

    # 2. Destination restarted with a certificate issued under the new anchor only.
    if staged:
        activate_anchor(store, now=utcnow())
    else:
        issue_issuer(store, now=utcnow())
    issuer = store.issuer()
    with pytest.raises(PKIError):
        verify_chain(issuer.certificate, issuer.chain, old, at=utcnow())
    kit.stop("destination")
    eventually(
        lambda: metric(admin, "trustmesh_destination_client_control_plane_up") == 0,
        15,
        "the proxy noticing destination is away",
    )
    kit.start_destination(mesh)
    eventually(
        lambda: metric(admin, "trustmesh_destination_client_control_plane_up") == 1,
        20,
        "the proxy reconnecting to the re-issued destination service",
    )
    before = updates()
    docs.append(workload("echo-1", echo_ports[1], "127.0.0.2", app="echo"))
    mesh.write_text(yaml.safe_dump_all([*docs, SERVICE]))
    eventually(lambda: updates() > before, 15, "an endpoint update from the new server")
    assert "certificate verify failed" not in kit.log("proxy-client-0").lower()
