"""The gRPC services end to end: a Linkerd-proto client against a real server on port 0."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import grpc
import pytest
from destination_testlib import WEB, WEB_1, eventually, write_atomic

from destination.errors import StartupError
from destination.service import DestinationServer, ServeOptions
from protos import destination_pb2 as d
from protos import destination_pb2_grpc as dg
from protos import policy_pb2 as p
from protos import policy_pb2_grpc as pg
from trustmesh.cli import cli
from trustmesh.errors import run_cli

AUTHORITY = "web.default.svc.cluster.local:8080"
WEB_ID = "web.default.serviceaccount.identity.trustmesh.cluster.local"


def addr(msg: d.TcpAddress) -> tuple[str, int]:
    return str(ipaddress.IPv4Address(msg.ip.ipv4)), msg.port


async def read(call: object, timeout: float = 5.0) -> object:
    return await asyncio.wait_for(call.read(), timeout)  # type: ignore[attr-defined]


async def test_get_resolves_and_streams_add_and_remove(
    server: DestinationServer, mesh_file: Path
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = dg.DestinationStub(ch).Get(
            d.GetDestination(
                scheme="k8s", path=AUTHORITY, context_token='{"ns":"default","pod":"x"}'
            )
        )
        first = await read(call)
        assert first.WhichOneof("update") == "add"
        (wa,) = first.add.addrs
        assert addr(wa.addr) == ("127.0.0.1", 18080)
        assert wa.weight == 10000
        assert wa.tls_identity.dns_like_identity.name == WEB_ID
        assert wa.tls_identity.server_name.name == WEB_ID
        assert wa.protocol_hint.WhichOneof("protocol") == "h2"
        assert wa.protocol_hint.opaque_transport.inbound_port == 14143
        assert dict(first.add.metric_labels) == {"service": "web", "namespace": "default"}
        assert wa.metric_labels["pod"] == "web-0"

        write_atomic(mesh_file, WEB + WEB_1)
        added = await read(call)
        assert added.WhichOneof("update") == "add"
        assert [addr(a.addr) for a in added.add.addrs] == [("127.0.0.2", 18080)]

        write_atomic(mesh_file, WEB_1.replace("---\n", "", 1) + "---\n" + WEB.split("---\n")[1])
        removed = await read(call)
        assert removed.WhichOneof("update") == "remove"
        assert [addr(a) for a in removed.remove.addrs] == [("127.0.0.1", 18080)]
        call.cancel()


async def test_port_defaults_to_80_and_unknown_service_is_not_found(
    server: DestinationServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = dg.DestinationStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read(stub.Get(d.GetDestination(path="nope.default.svc.cluster.local:8080")))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        # An existing service on a port it does not expose: exists, but no endpoints.
        msg = await read(stub.Get(d.GetDestination(path="web.default.svc.cluster.local")))
        assert msg.WhichOneof("update") == "no_endpoints" and msg.no_endpoints.exists
        for bad in (
            "10.0.0.1:80",
            "web.default.svc.other.domain:80",
            "web.default.svc.cluster.local:99999",
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await read(stub.Get(d.GetDestination(path=bad)))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, bad
        # A long path is refused by its length, and no message repeats it whole: the reason
        # used to exceed gRPC's metadata limit and reach the client as RESOURCE_EXHAUSTED.
        for length in (300, 20_000):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await read(stub.Get(d.GetDestination(path="a" * length)))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == (
                f"the destination path is {length} characters; a service name and port take "
                "at most 259"
            )


async def test_invalid_change_is_refused_and_last_good_state_served(
    server: DestinationServer, mesh_file: Path
) -> None:
    write_atomic(mesh_file, WEB.replace("targetPort: 18080", "targetPort: 99999"))
    await eventually(lambda: server.mesh_source and server.mesh_source.last_error)
    error = server.mesh_source.last_error  # type: ignore[union-attr]
    assert "document 2 (Service default/web)" in error and "spec.ports[0].targetPort" in error
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        msg = await read(dg.DestinationStub(ch).Get(d.GetDestination(path=AUTHORITY)))
        assert addr(msg.add.addrs[0].addr) == ("127.0.0.1", 18080)
    metrics = server.metrics.registry
    assert (
        metrics.get_sample_value(
            "trustmesh_destination_reloads_total", {"source": "mesh-file", "result": "refused"}
        )
        == 1
    )
    # Fixing the file applies it again.
    write_atomic(mesh_file, WEB + WEB_1)
    await eventually(lambda: server.mesh_source.last_error is None)  # type: ignore[union-attr]


async def test_an_emptied_mesh_file_does_not_remove_every_service(
    server: DestinationServer, mesh_file: Path
) -> None:
    # An empty file (a write in progress, a '>' by mistake) used to be applied as a mesh
    # without resources: every service vanished and every lookup answered NOT_FOUND.
    for emptied in ("", "# only a comment\n", "---\n"):
        mesh_file.write_text(emptied)  # not atomic on purpose: what a careless writer does
        await eventually(lambda: server.mesh_source and server.mesh_source.last_error)
        assert "no resources" in server.mesh_source.last_error  # type: ignore[union-attr,operator]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            msg = await read(dg.DestinationStub(ch).Get(d.GetDestination(path=AUTHORITY)))
            assert addr(msg.add.addrs[0].addr) == ("127.0.0.1", 18080)
        ok = {"source": "mesh-file"}
        assert (
            server.metrics.registry.get_sample_value("trustmesh_destination_last_reload_ok", ok)
            == 0
        )
        write_atomic(mesh_file, WEB)  # the content in use, put back
        await eventually(lambda: server.mesh_source.last_error is None)  # type: ignore[union-attr]
        assert (
            server.metrics.registry.get_sample_value("trustmesh_destination_last_reload_ok", ok)
            == 1
        )


async def test_server_refuses_to_start_on_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n")
    srv = DestinationServer(
        ServeOptions(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", mesh_file=bad)
    )
    with pytest.raises(
        ValueError, match=r"document 1 \(Service default/x\): spec.ports: is required"
    ):
        await srv.start()
    await srv.stop()


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
async def test_an_address_in_use_is_refused_and_the_first_server_keeps_it(
    server: DestinationServer, mesh_file: Path, which: str
) -> None:
    # grpc's default SO_REUSEPORT would let a second server share the first one's port.
    taken = {"listen": server.port, "admin_listen": server.admin_port}[which]
    options = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", which: f"127.0.0.1:{taken}"}
    second = DestinationServer(ServeOptions(mesh_file=mesh_file, **options))
    with pytest.raises(
        StartupError, match=f"cannot listen on 127.0.0.1:{taken}: Address already in use"
    ):
        await second.start()
    await second.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        for _ in range(8):  # with a shared port, some of these would reach the second server
            call = dg.DestinationStub(ch).Get(
                d.GetDestination(scheme="k8s", path=AUTHORITY, context_token="{}")
            )
            assert (await read(call)).WhichOneof("update") == "add"
            call.cancel()


def test_cli_port_in_use_is_one_line_and_exit_1(
    server: DestinationServer, mesh_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["destination", "serve", "--mesh-file", str(mesh_file),
            "--listen", f"127.0.0.1:{server.port}", "--admin-listen", "127.0.0.1:0"]  # fmt: skip
    assert run_cli(cli, args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: cannot listen on 127.0.0.1:{server.port}: Address already in use"
    assert not any("Traceback" in line for line in err)


async def test_policy_streams(server: DestinationServer, mesh_file: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        inbound = pg.InboundPoliciesStub(ch).Watch(
            p.PortSpec(workload='{"ns":"default","pod":"web-0"}', port=18080)
        )
        first = await read(inbound)
        assert first.server.kind == "default" and first.server.name == "all-unauthenticated"
        write_atomic(
            mesh_file,
            WEB
            + "---\napiVersion: trustmesh.io/v1alpha1\nkind: MeshConfig\nspec: {defaultInboundPolicy: deny}\n",
        )
        second = await read(inbound)
        assert second.server.name == "deny" and not second.authorizations
        inbound.cancel()

        outbound = pg.OutboundPoliciesStub(ch).Watch(p.TrafficSpec(authority=AUTHORITY))
        policy = await read(outbound)
        assert policy.routes[0].rules[0].backends[0].authority == AUTHORITY
        outbound.cancel()

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read(
                pg.InboundPoliciesStub(ch).Watch(p.PortSpec(workload="default:ghost", port=80))
            )
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read(pg.InboundPoliciesStub(ch).Watch(p.PortSpec(workload="nonsense", port=80)))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_admin_endpoints(server: DestinationServer) -> None:
    async def get(path: str) -> tuple[int, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", server.admin_port)
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), 5)
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    assert await get("/live") == (200, b"live\n")
    assert await get("/ready") == (200, b"ready\n")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = dg.DestinationStub(ch).Get(d.GetDestination(path=AUTHORITY))
        await read(call)
        status, body = await get("/metrics")
        assert status == 200
        assert b'trustmesh_destination_subscribers{stream="destination"} 1.0' in body
        assert b'trustmesh_destination_updates_sent_total{stream="destination"} 1.0' in body
        assert b"\nprocess_open_fds " in body and b"\nprocess_resident_memory_bytes " in body
        call.cancel()
    assert (await get("/nope"))[0] == 404


@pytest.mark.timeout(120)
async def test_thousands_of_streams_opened_at_once_are_all_served(
    server: DestinationServer,
) -> None:
    # After a restart of destination every proxy reopens its streams at once; grpc's own limit
    # on calls waiting for a handler (1,000 soft, 3,000 hard) cancelled hundreds of them.
    n = 4000
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    try:
        calls = [
            dg.DestinationStub(channels[i % 4]).Get(d.GetDestination(scheme="k8s", path=AUTHORITY))
            for i in range(n)
        ]
        firsts = await asyncio.gather(*(read(c, 60) for c in calls), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        assert not failed, f"{len(failed)} of {n} failed, e.g. {failed[0]!r}"
        assert all(f.WhichOneof("update") == "add" for f in firsts)  # type: ignore[union-attr]

        def subscribers() -> float | None:
            return server.metrics.registry.get_sample_value(
                "trustmesh_destination_subscribers", {"stream": "destination"}
            )

        assert subscribers() == n
        for call in calls:
            call.cancel()
        await eventually(lambda: subscribers() == 0)
    finally:
        for ch in channels:
            await ch.close()


async def test_an_oversized_request_is_refused_before_it_is_parsed(
    server: DestinationServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        big = d.GetDestination(scheme="k8s", path=AUTHORITY, context_token="x" * 70_000)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read(dg.DestinationStub(ch).Get(big))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = d.GetDestination(scheme="k8s", path=AUTHORITY)
        assert (await read(dg.DestinationStub(ch).Get(small))).WhichOneof("update") == "add"
