"""A trust-anchor rotation seen from the proxy's control-plane side, wired as the sidecar wires
it (``TrustAnchors`` following the destination's trust-bundle stream, the destination client's
channel following ``TrustAnchors``), against a real destination server over TLS that is
restarted with a certificate chaining only to the new anchor.

A client pinned to the startup anchors (the fixed credentials the sidecar used to build) is
refused by the re-issued server and stays on its last-known endpoints."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from destination_testlib import (
    DESTINATION_NAME,
    WEB,
    WEB_1,
    eventually,
    tls_server,
    write_atomic,
)
from loopback import unused_port

from destination.client import Backoff, DestinationClient
from destination.errors import Unavailable
from destination.paths import WorkloadRef
from pki.certs import utcnow
from pki.errors import PKIError
from pki.rotation import bundle_remove, init_anchor, issue_issuer
from pki.store import FileStore
from pki.verify import verify_chain
from proxy.control import DestinationRoutes, TrustAnchors
from proxy.rpc import Channel

pytestmark = pytest.mark.timeout(60)

SERVICE = "web.default.svc.cluster.local:8080"


def endpoint_count(routes: DestinationRoutes) -> int:
    service = routes.by_authority(SERVICE)
    return len(service.endpoints) if service is not None else -1


async def test_destination_channel_follows_an_anchor_rotation(
    tmp_path: Path, make_store: Callable[..., FileStore]
) -> None:
    store = make_store(at=utcnow())  # gRPC verifies against the wall clock
    old = store.trust_bundle()
    anchors_file = tmp_path / "anchors.pem"
    anchors_file.write_bytes(old.pem())
    mesh = tmp_path / "mesh.yaml"
    write_atomic(mesh, WEB)
    listen = f"127.0.0.1:{unused_port()}"
    backoff = Backoff(0.05, 0.2)

    anchors = TrustAnchors(anchors_file, clock=asyncio.get_running_loop().time, watch_file=False)
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(tls_server(store, mesh, listen))
        follower = await stack.enter_async_context(
            DestinationClient(
                listen,
                channels=Channel,
                workload=WorkloadRef("default", "web-0"),
                trust_bundle=anchors.current,
                server_name=DESTINATION_NAME,
                backoff=backoff,
                bundle_check_interval=0.05,
            )
        )
        pinned = await stack.enter_async_context(
            DestinationClient(
                listen,
                channels=Channel,
                roots_pem=old.pem(),
                server_name=DESTINATION_NAME,
                backoff=backoff,
            )
        )
        following = asyncio.create_task(
            anchors.follow(follower.trust_bundle(anchors.current().digest))
        )
        stack.callback(following.cancel)
        routes = DestinationRoutes(follower, "default")
        assert await routes.prefetch([SERVICE], 5) == []
        assert endpoint_count(routes) == 1
        pinned_watch = pinned.resolve(SERVICE)
        await pinned_watch.wait_ready(5)

        # 1. A new anchor beside the old one; the destination streams the two-anchor bundle and
        #    the proxy's channel moves to it while the server still presents an old-anchor chain.
        init_anchor(store, now=utcnow(), rotate=True)
        both = store.trust_bundle()
        await eventually(lambda: follower.trust_bundle_digest == both.digest, timeout=10)
        assert anchors.current().digest == both.digest and anchors.source == "destination"

        # 2. The control plane's certificates re-issued under the new anchor only.
        issue_issuer(store, now=utcnow())
        issuer = store.issuer()
        with pytest.raises(PKIError):
            verify_chain(issuer.certificate, issuer.chain, old, at=utcnow())
        await server.stop()
        await stack.enter_async_context(tls_server(store, mesh, listen))

        write_atomic(mesh, WEB + WEB_1)
        await eventually(lambda: endpoint_count(routes) == 2, timeout=15)
        # Every watch is back on the restarted server (the endpoints watch may be first; the
        # others reconnect on their own backoff).
        await eventually(lambda: follower.control_plane_up, timeout=10)
        # Without the new anchor the handshake is refused: last-known endpoints, flagged stale.
        await eventually(lambda: "certificate verify failed" in str(pinned_watch.error), 15)
        assert isinstance(pinned_watch.error, Unavailable)
        assert pinned_watch.stale and not pinned.control_plane_up
        assert pinned_watch.current is not None and len(pinned_watch.current.endpoints) == 1

        # 3. The old anchor removed: the proxy verifies the control plane with the new one only.
        bundle_remove(store, old.anchors[0].fingerprint, now=utcnow(), force=True)
        new_only = store.trust_bundle()
        assert new_only.anchors == both.anchors[1:]
        await eventually(lambda: follower.trust_bundle_digest == new_only.digest, timeout=10)
        write_atomic(mesh, WEB)
        await eventually(lambda: endpoint_count(routes) == 1, timeout=15)
        await eventually(lambda: follower.control_plane_up, timeout=10)
        assert follower.metrics.channel_rebuilds == 2
        assert pinned_watch.stale
