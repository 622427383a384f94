"""The proxy's client: snapshots, and last-known state while the service is stopped/restarted."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from destination_testlib import WEB, WEB_1, eventually, quick_client, write_atomic
from loopback import unused_port

from destination.client import Backoff, DestinationClient
from destination.paths import WorkloadRef
from destination.policy import Protocol
from destination.service import DestinationServer, ServeOptions
from protos import destination_pb2 as d
from protos import destination_pb2_grpc as dg
from proxy.rpc import Channel

AUTHORITY = "web.default.svc.cluster.local:8080"


def test_backoff_is_jittered_and_capped() -> None:
    b = Backoff(base=0.1, maximum=1.0, jitter=0.5)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(8)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert delays[-1] <= 1.0 and delays[-1] >= 0.5


async def test_last_known_state_while_server_is_away(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    write_atomic(mesh, WEB)
    port = unused_port()
    options = ServeOptions(listen=f"127.0.0.1:{port}", admin_listen="127.0.0.1:0", mesh_file=mesh)
    server = DestinationServer(options)
    await server.start()
    client = quick_client(port, WorkloadRef("default", "web-0"))
    try:
        endpoints = client.resolve(AUTHORITY)
        inbound = client.inbound_policy(18080)
        first = await endpoints.wait_ready(5)
        assert [e.key for e in first.endpoints] == [("127.0.0.1", 18080)]
        assert (
            first.endpoints[0].identity
            == "web.default.serviceaccount.identity.trustmesh.cluster.local"
        )
        assert (await inbound.wait_ready(5)).protocol is Protocol.DETECT
        assert client.control_plane_up

        await server.stop()
        await eventually(lambda: endpoints.stale and inbound.stale)
        assert not client.control_plane_up
        assert client.metrics.up == 0
        assert endpoints.current == first  # still serving the last-known snapshot

        write_atomic(mesh, WEB + WEB_1)  # changes while away show up after the restart
        server = DestinationServer(options)
        await server.start()
        snapshot = await eventually(
            lambda: (
                not endpoints.stale and len(endpoints.current.endpoints) == 2 and endpoints.current
            ),
            timeout=10,
        )
        assert {e.address for e in snapshot.endpoints} == {"127.0.0.1", "127.0.0.2"}
        await eventually(lambda: client.control_plane_up, timeout=10)
        assert client.metrics.up == 1
    finally:
        await client.close()
        await server.stop()


async def test_unknown_service_is_an_answer_and_bad_name_is_terminal(
    server: DestinationServer,
) -> None:
    async with DestinationClient(
        f"127.0.0.1:{server.port}", channels=Channel, backoff=Backoff(0.05, 0.1)
    ) as client:
        missing = await client.resolve("ghost.default.svc.cluster.local:80").wait_ready(5)
        assert not missing.exists and not missing.endpoints
        bad = client.resolve("10.0.0.1:80")
        await eventually(lambda: bad.done)
        assert "IP queries" in str(bad.error)


async def test_updates_yield_immutable_snapshots(
    server: DestinationServer, mesh_file: Path
) -> None:
    async with DestinationClient(f"127.0.0.1:{server.port}", channels=Channel) as client:
        watch = client.resolve(AUTHORITY)
        seen = []
        async for snap in watch.updates():
            seen.append(snap)
            if len(seen) == 1:
                write_atomic(mesh_file, WEB + WEB_1)
            elif len(snap.endpoints) == 2:
                break
        assert len(seen[0].endpoints) == 1  # the first snapshot was not mutated


class _Spoiled(dg.DestinationServicer):
    """A real Destination server whose first stream carries an update no client can read (a
    port outside 1..65535); later streams carry a good one."""

    def __init__(self) -> None:
        self.streams = 0

    async def Get(self, request: d.GetDestination, context: object) -> AsyncIterator[d.Update]:
        self.streams += 1
        update = d.Update()
        addr = update.add.addrs.add()
        addr.addr.ip.ipv4 = 0x7F000001
        addr.addr.port = 70000 if self.streams == 1 else 18080
        yield update
        await asyncio.sleep(30)  # a stream stays open, as the real one does


async def test_an_unreadable_update_resubscribes_instead_of_ending_the_watch() -> None:
    servicer = _Spoiled()
    server = grpc.aio.server()
    dg.add_DestinationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = quick_client(port)
    try:
        endpoints = client.resolve(AUTHORITY)
        await eventually(lambda: servicer.streams >= 2)
        ready = await endpoints.wait_ready(5)
        assert [e.key for e in ready.endpoints] == [("127.0.0.1", 18080)]
        assert not endpoints.stale and endpoints.error is None
        assert client.metrics.reconnects["destination"] >= 1
    finally:
        await client.close()
        await server.stop(0)
