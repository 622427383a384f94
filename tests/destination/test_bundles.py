"""The trust-bundle stream: proxies learn a new anchor set when the bundle file changes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from destination_testlib import WEB, eventually, write_atomic

from destination.client import DestinationClient
from destination.service import DestinationServer, ServeOptions
from pki.bundle import TrustBundle
from pki.certs import create_anchor
from pki.keys import PrivateKey
from proxy.rpc import Channel

NOW = datetime(2030, 1, 1, tzinfo=UTC)


async def test_bundle_stream_follows_the_file(tmp_path: Path) -> None:
    mesh, anchors = tmp_path / "mesh.yaml", tmp_path / "anchors.pem"
    write_atomic(mesh, WEB)
    first = create_anchor(PrivateKey.generate(), now=NOW, common_name="anchor one")
    second = create_anchor(PrivateKey.generate(), now=NOW, common_name="anchor two")
    anchors.write_bytes(first.pem)
    options = ServeOptions(
        listen="127.0.0.1:0", admin_listen="127.0.0.1:0", mesh_file=mesh, trust_bundle=anchors
    )
    async with (
        DestinationServer(options) as server,
        DestinationClient(f"127.0.0.1:{server.port}", channels=Channel) as c,
    ):
        watch = c.trust_bundle()
        one = await watch.wait_ready(5)
        assert one.digest == TrustBundle.from_pem(first.pem).digest
        assert one.fingerprints == (first.fingerprint,)
        write_atomic(anchors, (first.pem + second.pem).decode())  # rotation: both anchors overlap
        two = await eventually(lambda: watch.current.digest != one.digest and watch.current)
        assert set(two.fingerprints) == {first.fingerprint, second.fingerprint}
        write_atomic(anchors, "not a certificate")  # a broken file keeps the last good bundle
        await eventually(
            lambda: server.metrics.registry.get_sample_value(
                "trustmesh_destination_trust_bundle_refreshes_total", {"result": "failed"}
            )
        )
        assert watch.current == two and not watch.stale


async def test_no_bundle_configured_is_unavailable(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    write_atomic(mesh, WEB)
    options = ServeOptions(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", mesh_file=mesh)
    async with (
        DestinationServer(options) as server,
        DestinationClient(f"127.0.0.1:{server.port}", channels=Channel) as c,
    ):
        watch = c.trust_bundle()
        await eventually(lambda: watch.error is not None)
        assert "UNAVAILABLE" in str(watch.error) and watch.current is None
