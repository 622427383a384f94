"""The client's channel follows its trust bundle, against a real destination server over TLS: a
new bundle moves working watches to a new channel without losing their state, and a bundle the
server cannot be verified with leaves the old channel in use for the grace period only."""

from __future__ import annotations

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

from destination.client import Backoff, DestinationClient
from destination.errors import Unavailable
from pki.bundle import TrustBundle
from pki.certs import utcnow
from pki.rotation import init_anchor
from pki.store import FileStore
from proxy.rpc import Channel

AUTHORITY = "web.default.svc.cluster.local:8080"


@pytest.fixture
def store(make_store: Callable[..., FileStore]) -> FileStore:
    # gRPC verifies the server's chain against the wall clock: it must be valid now.
    return make_store(at=utcnow())


def following(port: int, bundle: list[TrustBundle], **kwargs: float) -> DestinationClient:
    """A client whose channel follows ``bundle[0]``, checked every 50 ms."""
    return DestinationClient(
        f"127.0.0.1:{port}",
        channels=Channel,
        trust_bundle=lambda: bundle[0],
        server_name=DESTINATION_NAME,
        bundle_check_interval=0.05,
        backoff=Backoff(0.05, 0.2),
        **kwargs,  # type: ignore[arg-type]
    )


def record_control_plane_up(client: DestinationClient) -> list[bool]:
    """Every value ``control_plane_up`` takes from now on (recorded at each stale change)."""
    history: list[bool] = []
    changed = client._stale_changed

    def recording() -> None:
        changed()
        history.append(client.control_plane_up)

    client._stale_changed = recording  # type: ignore[method-assign]
    return history


async def test_a_new_bundle_moves_working_watches_to_a_new_channel(
    store: FileStore, mesh_file: Path
) -> None:
    bundle = [store.trust_bundle()]
    async with (
        tls_server(store, mesh_file) as server,
        following(server.port, bundle) as client,
    ):
        watch = client.resolve(AUTHORITY)
        first = await watch.wait_ready(5)
        assert client.trust_bundle_digest == bundle[0].digest
        up_history = record_control_plane_up(client)

        init_anchor(store, now=utcnow(), rotate=True)  # anchor rotation: old + new anchors
        bundle[0] = store.trust_bundle()
        assert len(bundle[0].anchors) == 2
        await eventually(lambda: client.trust_bundle_digest == bundle[0].digest)
        # The new channel connected, the old one was closed under the stream, and the watch
        # resubscribed once, on the new channel, its snapshot kept all along.
        await eventually(lambda: client.metrics.reconnects["destination"] == 1 and not watch.stale)
        assert watch.current == first
        assert client.metrics.channel_rebuilds == 1
        # A planned handover never reads as the control plane going away.
        assert up_history == [] or all(up_history), up_history
        assert client.control_plane_up

        write_atomic(mesh_file, WEB + WEB_1)
        await eventually(lambda: watch.current is not None and len(watch.current.endpoints) == 2)
        assert client.control_plane_up


async def test_an_unverifiable_bundle_keeps_the_old_channel_for_the_grace_only(
    store: FileStore, mesh_file: Path, make_store: Callable[..., FileStore]
) -> None:
    good = store.trust_bundle()
    unrelated = make_store(at=utcnow(), name="other").trust_bundle()
    bundle = [good]
    async with (
        tls_server(store, mesh_file) as server,
        following(server.port, bundle, handover_grace=4.0) as client,
    ):
        watch = client.resolve(AUTHORITY)
        await watch.wait_ready(5)

        bundle[0] = unrelated  # the server's certificate does not chain to it
        await eventually(lambda: client.trust_bundle_digest == unrelated.digest)
        # Within the grace the working channel keeps the watch live: updates still arrive.
        write_atomic(mesh_file, WEB + WEB_1)
        await eventually(
            lambda: watch.current is not None and len(watch.current.endpoints) == 2, timeout=3
        )
        assert not watch.stale

        # After it, the old channel is gone and the new one is refused: last-known state only.
        await eventually(lambda: watch.stale, timeout=10)
        await eventually(lambda: "UNAVAILABLE" in str(watch.error), timeout=5)
        assert isinstance(watch.error, Unavailable)
        assert watch.current is not None and len(watch.current.endpoints) == 2
        assert not client.control_plane_up

        bundle[0] = good  # the operator fixes the bundle: the next channel connects
        write_atomic(mesh_file, WEB)
        await eventually(
            lambda: (
                not watch.stale and watch.current is not None and len(watch.current.endpoints) == 1
            ),
            timeout=10,
        )
        assert client.metrics.channel_rebuilds == 2


def test_fixed_roots_and_a_bundle_provider_are_exclusive_and_tls_needs_one(
    store: FileStore,
) -> None:
    with pytest.raises(ValueError, match="not both"):
        DestinationClient(
            "127.0.0.1:1",
            channels=Channel,
            roots_pem=store.trust_bundle().pem(),
            trust_bundle=store.trust_bundle,
        )
    with pytest.raises(ValueError, match="needs roots_pem or a trust-bundle provider"):
        DestinationClient("127.0.0.1:1", channels=Channel, server_name=DESTINATION_NAME)
