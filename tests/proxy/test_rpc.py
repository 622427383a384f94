"""The proxy's gRPC channel against real grpcio servers, a silent peer and a classical TLS server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import h2.events
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from protos.rpc import RpcError, StatusCode
from proxy.grpc_frames import frame
from proxy.meshtls import HYBRID_GROUP, MeshCredentials
from proxy.rpc import Channel
from proxy.settings import KexPolicy, Target, parse_target

SERVER = ("trustmesh-destination", "trustmesh")


class Handlers:
    """One service, ``t.Test``, whose methods the tests drive; it records what the server saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.time_remaining: float | None = None
        self.held = 0  # calls waiting in ``held``/``held_stream`` for ``release``
        self.release = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.time_remaining = context.time_remaining()
        return request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())
        raise AssertionError("abort returned")

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def huge(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"x" * (5 * 1024 * 1024)

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def count_then_fail(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no more for you")

    async def forever(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.held += 1
        await self.release.wait()
        return request

    async def hold_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"before"
        self.held += 1
        await self.release.wait()
        yield b"after"

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        stream = grpc.unary_stream_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            "t.Test",
            {
                "Echo": unary(self.echo),
                "Fail": unary(self.fail),
                "Slow": unary(self.slow),
                "Huge": unary(self.huge),
                "Count": stream(self.count),
                "CountThenFail": stream(self.count_then_fail),
                "Forever": stream(self.forever),
                "Hold": unary(self.hold),
                "HoldStream": stream(self.hold_stream),
            },
        )


@contextlib.asynccontextmanager
async def serve(
    handlers: Handlers, tls: MeshCredentials | None = None, port: int = 0
) -> AsyncIterator[int]:
    server = grpc.aio.server(options=[("grpc.http2.min_ping_interval_without_data_ms", 1_000)])
    server.add_generic_rpc_handlers((handlers.handler(),))
    address = f"127.0.0.1:{port}"
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)])
        port = server.add_secure_port(address, creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@pytest.fixture
def tls(pki: Any) -> MeshCredentials:
    return pki.credentials(*SERVER)


async def collect(stream: Any) -> list[bytes]:
    return [message async for message in stream]


async def test_unary_and_streams_over_tls_with_the_hybrid_group(
    pki: Any, tls: MeshCredentials
) -> None:
    handlers = Handlers()
    seen: list[tuple[str, str, str]] = []
    async with (
        serve(handlers, tls) as port,
        Channel(
            f"127.0.0.1:{port}",
            roots_pem=pki.bundle.pem(),
            server_name=tls.identity,
            on_handshake=lambda *h: seen.append(h),
        ) as channel,
    ):
        assert await channel.unary("/t.Test/Echo", b"hello", timeout=5) == b"hello"
        assert channel.group == HYBRID_GROUP
        # The deadline travelled as grpc-timeout.
        assert handlers.time_remaining is not None and 0 < handlers.time_remaining <= 5
        assert await collect(channel.stream("/t.Test/Count", b"3")) == [b"0", b"1", b"2"]
        assert await collect(channel.stream("/t.Test/Count", b"0")) == []
        # Calls share the connection.
        answers = await asyncio.gather(
            *(channel.unary("/t.Test/Echo", str(i).encode(), timeout=5) for i in range(50))
        )
        assert answers == [str(i).encode() for i in range(50)]
        assert len(channel._connections) == 1
        assert seen == [(tls.identity, HYBRID_GROUP, "ok")]  # one connection, one handshake


async def test_statuses_reach_the_caller() -> None:
    handlers = Handlers()
    async with serve(handlers) as port, Channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(RpcError) as e:
            await channel.unary("/t.Test/Fail", "no such thing: é, 100%".encode(), timeout=5)
        assert e.value.code is StatusCode.NOT_FOUND
        assert e.value.details == "no such thing: é, 100%"
        with pytest.raises(RpcError) as e:
            await channel.unary("/t.Test/Missing", b"", timeout=5)
        assert e.value.code is StatusCode.UNIMPLEMENTED
        received = []
        with pytest.raises(RpcError) as e:
            async for message in channel.stream("/t.Test/CountThenFail", b""):
                received.append(message)
        assert received == [b"one", b"two"]
        assert e.value.code is StatusCode.PERMISSION_DENIED and e.value.details == "no more for you"
        # A message over the limit is refused; the connection carries on.
        with pytest.raises(RpcError) as e:
            await channel.unary("/t.Test/Huge", b"", timeout=5)
        assert e.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert await channel.unary("/t.Test/Echo", b"after", timeout=5) == b"after"


async def test_a_deadline_ends_the_call_on_both_sides() -> None:
    handlers = Handlers()
    async with serve(handlers) as port, Channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        with pytest.raises(RpcError) as e:
            await channel.unary("/t.Test/Slow", b"", timeout=0.3)
        assert e.value.code is StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        await asyncio.wait_for(handlers.cancelled.wait(), 5)


async def test_cancelling_a_stream_cancels_it_at_the_server() -> None:
    handlers = Handlers()
    async with serve(handlers) as port, Channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream("/t.Test/Forever", b"")
        assert await anext(aiter(stream)) == b"first"
        stream.cancel()
        await asyncio.wait_for(handlers.cancelled.wait(), 5)
        assert await collect(stream) == []


async def test_closing_the_channel_ends_its_calls_with_cancelled() -> None:
    handlers = Handlers()
    async with serve(handlers) as port:
        channel = Channel(f"127.0.0.1:{port}")
        stream = channel.stream("/t.Test/Forever", b"")
        assert await anext(aiter(stream)) == b"first"
        pending = asyncio.ensure_future(anext(aiter(stream)))
        await asyncio.sleep(0.05)
        await channel.close()
        with pytest.raises(RpcError) as e:
            await pending
        assert e.value.code is StatusCode.CANCELLED and channel.closed
        with pytest.raises(RpcError) as e:
            await channel.unary("/t.Test/Echo", b"", timeout=1)
        assert e.value.code is StatusCode.CANCELLED
        await asyncio.wait_for(handlers.cancelled.wait(), 5)


async def test_a_server_restart_fails_open_calls_and_the_next_call_reconnects() -> None:
    handlers = Handlers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    channel = Channel(f"127.0.0.1:{port}")
    with pytest.raises(RpcError) as e:
        await channel.unary("/t.Test/Echo", b"", timeout=5)
    assert e.value.code is StatusCode.UNAVAILABLE and "cannot connect" in e.value.details
    async with serve(handlers, port=port):
        await asyncio.wait_for(channel.ready(), 5)
        stream = channel.stream("/t.Test/Forever", b"")
        assert await anext(aiter(stream)) == b"first"
    with pytest.raises(RpcError) as e:
        await anext(aiter(stream))
    assert e.value.code in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)
    async with serve(handlers, port=port):
        assert await channel.unary("/t.Test/Echo", b"again", timeout=5) == b"again"
    await channel.close()


async def until(condition: Any, what: str) -> None:
    for _ in range(500):  # 5 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_graceful_server_stop_lets_the_open_calls_finish() -> None:
    # grpc's graceful stop sends GOAWAY, then waits (here up to 10 s) for the calls it has.
    handlers = Handlers()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Channel(f"127.0.0.1:{port}") as channel:
            unary = asyncio.ensure_future(channel.unary("/t.Test/Hold", b"done", timeout=10))
            stream = channel.stream("/t.Test/HoldStream", b"")
            assert await anext(aiter(stream)) == b"before"
            await until(lambda: handlers.held == 2, "both calls at the server")
            conn = channel._current
            assert conn is not None
            stopping = asyncio.ensure_future(server.stop(10))
            await until(lambda: conn.draining, "the GOAWAY")
            handlers.release.set()
            assert await unary == b"done"
            assert await collect(stream) == [b"after"]
            await stopping
            await until(lambda: conn.failure is not None, "the drained connection's close")
            # New calls never went to the draining connection; the server is gone now.
            with pytest.raises(RpcError) as e:
                await channel.unary("/t.Test/Echo", b"", timeout=2)
            assert e.value.code is StatusCode.UNAVAILABLE and "cannot connect" in e.value.details
    finally:
        await server.stop(None)


class GoawayServer(asyncio.Protocol):
    """An HTTP/2 server that, once it has ``calls`` requests, sends GOAWAY naming the first
    as the last it will process, answers that one, and waits for the client to close."""

    def __init__(self, calls: int) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False))
        self.calls = calls
        self.code = ErrorCodes.NO_ERROR
        self.streams: list[int] = []
        self.client_closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                self.streams.append(event.stream_id)
                if len(self.streams) == self.calls:
                    first = self.streams[0]
                    # Written by hand: h2 sends nothing more after its own GOAWAY.
                    body = first.to_bytes(4, "big") + self.code.to_bytes(4, "big") + b"going away"
                    goaway = len(body).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00" + body
                    self.transport.write(self.h2.data_to_send() + goaway)
                    self.h2.send_headers(
                        first, [(":status", "200"), ("content-type", "application/grpc")]
                    )
                    self.h2.send_data(first, frame(b"processed"))
                    self.h2.send_headers(first, [("grpc-status", "0")], end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.client_closed.set()
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_closed.set()


async def test_a_goaway_fails_only_the_calls_the_server_never_processed() -> None:
    loop = asyncio.get_running_loop()
    peer = GoawayServer(calls=2)
    server = await loop.create_server(lambda: peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Channel(f"127.0.0.1:{port}") as channel:
            first, second = await asyncio.gather(
                channel.unary("/t.Test/Echo", b"1", timeout=5),
                channel.unary("/t.Test/Echo", b"2", timeout=5),
                return_exceptions=True,
            )
            assert first == b"processed"
            assert isinstance(second, RpcError) and second.code is StatusCode.UNAVAILABLE
            assert "GOAWAY NO_ERROR going away" in second.details
            assert "the call was not processed" in second.details
            # Its last call done, the client closes the drained connection itself.
            await asyncio.wait_for(peer.client_closed.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_peer_that_stops_answering_pings_fails_the_calls() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass  # reads everything, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Channel(f"127.0.0.1:{port}", keepalive=0.2, keepalive_timeout=0.3) as channel:
            started = time.monotonic()
            with pytest.raises(RpcError) as e:
                await collect(channel.stream("/t.Test/Forever", b""))
            assert e.value.code is StatusCode.UNAVAILABLE
            assert "did not answer a keepalive ping" in e.value.details
            assert time.monotonic() - started < 3
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_refusing_our_ping_rate_makes_the_channel_ping_less() -> None:
    handlers = Handlers()
    server = grpc.aio.server()  # grpc's default: pings at most every 5 minutes without data
    server.add_generic_rpc_handlers((handlers.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Channel(f"127.0.0.1:{port}", keepalive=0.3) as channel:
            with pytest.raises(RpcError) as e:
                await asyncio.wait_for(collect(channel.stream("/t.Test/Forever", b"")), 10)
            # The server ends the call itself after its GOAWAY (grpc: "Too many pings").
            assert e.value.code is StatusCode.UNAVAILABLE
            assert "too many pings" in e.value.details.replace("_", " ").lower()
            assert channel._keepalive == 0.6
            assert await channel.unary("/t.Test/Echo", b"still", timeout=5) == b"still"
    finally:
        await server.stop(None)


async def test_the_server_must_prove_the_expected_name_under_the_given_anchors(
    pki: Any, other_pki: Any, tls: MeshCredentials
) -> None:
    seen: list[tuple[str, str, str]] = []
    async with serve(Handlers(), tls) as port:
        target = f"127.0.0.1:{port}"
        wrong_name = Channel(
            target,
            roots_pem=pki.bundle.pem(),
            server_name="web.default.svc",
            on_handshake=lambda *h: seen.append(h),
        )
        with pytest.raises(RpcError) as e:
            await wrong_name.unary("/t.Test/Echo", b"", timeout=5)
        assert e.value.code is StatusCode.UNAVAILABLE and "not the expected" in e.value.details
        strangers = Channel(
            target,
            roots_pem=other_pki.bundle.pem(),
            server_name=tls.identity,
            on_handshake=lambda *h: seen.append(h),
        )
        with pytest.raises(RpcError) as e:
            await strangers.unary("/t.Test/Echo", b"", timeout=5)
        assert "certificate verify failed" in e.value.details
        await wrong_name.close()
        await strangers.close()
    assert [(server, result) for server, _group, result in seen] == [
        ("web.default.svc", "identity_mismatch"),
        (tls.identity, "error"),
    ]
    with pytest.raises(ValueError, match="roots_pem"):
        Channel("127.0.0.1:1", server_name=tls.identity)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        Channel("127.0.0.1")


def test_a_classical_server_is_refused_under_hybrid_required_and_without_http2(
    pki: Any, tls: MeshCredentials, tmp_path: Path
) -> None:
    """The system's openssl s_server (OpenSSL 3.0: no ML-KEM) stands for a classical service."""
    end = b"-----END CERTIFICATE-----\n"
    leaf, rest = tls.chain_pem.split(end, 1)
    (tmp_path / "leaf.pem").write_bytes(leaf + end)
    (tmp_path / "chain.pem").write_bytes(rest)
    (tmp_path / "key.pem").write_bytes(tls.key_pem)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", "leaf.pem",
         "-cert_chain", "chain.pem", "-key", "key.pem", "-tls1_3", "-quiet"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "openssl s_server did not start"
            time.sleep(0.05)

        seen: list[tuple[str, str, str]] = []

        async def attempt(kex: KexPolicy) -> RpcError:
            channel = Channel(
                f"127.0.0.1:{port}",
                roots_pem=pki.bundle.pem(),
                server_name=tls.identity,
                kex=kex,
                on_handshake=lambda *h: seen.append(h),
            )
            try:
                with pytest.raises(RpcError) as e:
                    await channel.unary("/t.Test/Echo", b"", timeout=5)
            finally:
                await channel.close()
            return e.value

        required = asyncio.run(attempt(KexPolicy.HYBRID_REQUIRED))
        assert required.code is StatusCode.UNAVAILABLE
        assert f"{HYBRID_GROUP} is required" in required.details
        # Allowed a classical group, the handshake completes; but the server did not select
        # HTTP/2, so it is not a gRPC service.
        preferred = asyncio.run(attempt(KexPolicy.HYBRID_PREFERRED))
        assert preferred.code is StatusCode.UNAVAILABLE
        assert "did not negotiate ALPN h2" in preferred.details
        assert seen == [
            (tls.identity, "x25519", "kex_refused"),
            (tls.identity, "x25519", "alpn_refused"),
        ]
    finally:
        server.kill()
        server.wait()


def test_the_channel_runs_on_uvloop() -> None:
    async def main() -> None:
        handlers = Handlers()
        async with serve(handlers) as port, Channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary("/t.Test/Echo", b"uv", timeout=5) == b"uv"
            assert await collect(channel.stream("/t.Test/Count", b"2")) == [b"0", b"1"]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_targets_parse_as_grpc_names_them() -> None:
    assert parse_target("127.0.0.1:8086") == Target(addresses=(("127.0.0.1", 8086),))
    assert parse_target("[::1]:8086") == Target(addresses=(("::1", 8086),))
    assert parse_target("dns:///identity.trustmesh:8080") == Target(
        addresses=(("identity.trustmesh", 8080),)
    )
    assert parse_target("dns://8.8.8.8/svc:1") == Target(addresses=(("svc", 1),))
    assert parse_target("ipv4:10.0.0.1:1,10.0.0.2:2") == Target(
        addresses=(("10.0.0.1", 1), ("10.0.0.2", 2))
    )
    assert parse_target("ipv6:[::1]:3") == Target(addresses=(("::1", 3),))
    assert parse_target("unix:///run/x.sock") == Target(path="/run/x.sock")
    assert parse_target("unix:x.sock") == Target(path="x.sock")
    assert parse_target("unix-abstract:x") == Target(path="\0x")
    for bad, reason in [("identity", "is not HOST:PORT"), ("h:0", "is not HOST:PORT"),
                        ("h:8²", "is not HOST:PORT"), ("h:" + "9" * 5000, "is not HOST:PORT"),
                        ("dns:///h", "is not HOST:PORT"), ("unix:", "no socket path"),
                        ("vsock:1:2", "vsock targets are not supported")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse_target(bad)


async def test_a_unix_socket_target(tmp_path: Path) -> None:
    handlers = Handlers()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers.handler(),))
    server.add_insecure_port(f"unix://{tmp_path}/grpc.sock")
    await server.start()
    try:
        async with Channel(f"unix://{tmp_path}/grpc.sock") as channel:
            assert await channel.unary("/t.Test/Echo", b"local", timeout=5) == b"local"
    finally:
        await server.stop(None)
