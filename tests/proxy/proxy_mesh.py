"""Test helpers: a mesh of two in-process proxies in front of a real aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Proxy, ProxySettings
from proxy.meshtls import MeshCredentials, StaticCredentials
from proxy.outbound import Outbound
from proxy.policy import InboundPolicy, StaticPolicy
from proxy.routes import Endpoint, Service, ServiceProtocol, StaticRoutes
from proxy.settings import KexPolicy, Listen

LOOPBACK = Listen("127.0.0.1", 0)


async def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "x-client-id": request.headers.get("l5d-client-id", "-"),
                "x-method": request.method,
                "x-te": request.headers.get("transfer-encoding", "-"),
            }
        )
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = int(request.headers.get("content-length", "0") or 0)
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "10"))):
            await resp.write(b"part %d\n" % i)
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
        return sock

    async def sleep(request: web.Request) -> web.StreamResponse:
        """Waits ``before`` seconds, sends the head and a first line, waits ``after`` seconds,
        then ends the body."""
        await asyncio.sleep(float(request.query.get("before", "0")))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"head\n")
        await asyncio.sleep(float(request.query.get("after", "0")))
        await resp.write(b"done\n")
        await resp.write_eof()
        return resp

    seen: dict[str, int] = {}

    async def flaky(request: web.Request) -> web.StreamResponse:
        """Counts the requests of each ``key``; the first ``fail`` are answered 503 (after
        ``sleep`` seconds, if given), the rest 200 with the request body and the count."""
        key = request.query.get("key", "")
        n = seen[key] = seen.get(key, 0) + 1
        body = await request.read()
        if n <= int(request.query.get("fail", "0")):
            await asyncio.sleep(float(request.query.get("sleep", "0")))
            return web.Response(status=int(request.query.get("status", "503")), body=b"no")
        return web.Response(body=body, headers={"x-count": str(n)})

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(seen.get(request.query.get("key", ""), 0)))

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/flaky", flaky)
    app.router.add_get("/count", count)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/slow", sleep)  # the same, on a path tests leave without timeouts
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", ws)
    return app


@contextlib.asynccontextmanager
async def run_app() -> AsyncIterator[int]:
    runner = web.AppRunner(await echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@dataclass
class Mesh:
    client: Proxy
    server: Proxy
    app_port: int
    routes: StaticRoutes
    server_policy: StaticPolicy
    client_creds: StaticCredentials

    @property
    def outbound(self) -> int:
        return self.client.port("outbound")


@contextlib.asynccontextmanager
async def run_mesh(
    web_creds: MeshCredentials,
    api_creds: MeshCredentials,
    *,
    app_port: int,
    expected_identity: str | None = None,
    policy: InboundPolicy | None = None,
    tcp_port: int | None = None,
    kex: KexPolicy = KexPolicy.HYBRID_REQUIRED,
) -> AsyncIterator[Mesh]:
    """A client proxy (identity web) and a server proxy (identity api) in front of the app."""
    server_policy = StaticPolicy(policy or InboundPolicy())
    server = Proxy(
        StaticCredentials(api_creds),
        StaticRoutes(),
        server_policy,
        ProxySettings(outbound=LOOPBACK, inbound=LOOPBACK, admin=None, kex=kex),
    )
    await server.start()
    routes = StaticRoutes()
    client_creds = StaticCredentials(web_creds)
    upstreams = ((LOOPBACK, "tcp-echo"),) if tcp_port else ()
    client = Proxy(
        client_creds,
        routes,
        StaticPolicy(),
        ProxySettings(
            outbound=LOOPBACK, inbound=LOOPBACK, admin=LOOPBACK, kex=kex, upstreams=upstreams
        ),
    )
    await client.start()
    ident = expected_identity or api_creds.identity
    inbound = server.port("inbound")
    services = [
        Service(
            "api", (Endpoint("127.0.0.1", app_port, ident, inbound),), authorities=("api.local",)
        ),
        Service("direct", (Endpoint("127.0.0.1", app_port),)),
    ]
    if tcp_port:
        services.append(
            Service(
                "tcp-echo",
                (Endpoint("127.0.0.1", tcp_port, ident, inbound),),
                ServiceProtocol.OPAQUE,
            )
        )
    routes.replace(tuple(services))
    try:
        yield Mesh(client, server, app_port, routes, server_policy, client_creds)
    finally:
        await client.stop()
        await server.stop()


@contextlib.asynccontextmanager
async def behind_the_mesh(
    pki: Any, app: Any, *, opaque: bool = False, policy: InboundPolicy | None = None
) -> AsyncIterator[Mesh]:
    """``app`` (an asyncio stream handler) on a local port, behind two proxies: web -> api
    (``opaque``: also as the service ``tcp-echo``, relayed through the client's upstream
    listener ``upstream:tcp-echo``)."""
    server = await asyncio.start_server(app, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with run_mesh(
            pki.credentials("web"),
            pki.credentials("api"),
            app_port=port,
            tcp_port=port if opaque else None,
            policy=policy,
        ) as mesh:
            yield mesh
    finally:
        server.close()


async def half_closed_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to ``port``, half-close, and read the answer to EOF (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


async def read_all_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An opaque app: reads to EOF (the client's half-close), then answers with the byte count
    and closes."""
    total = 0
    while chunk := await reader.read(65536):
        total += len(chunk)
    writer.write(b"got %d" % total)
    await writer.drain()
    writer.close()


async def raw_exchange(port: int, request: bytes, *, until_close: bool = True) -> bytes:
    """Send raw bytes to ``port`` and read the reply (to EOF, bounded by a timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(-1) if until_close else await reader.read(65536)
    finally:
        writer.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the ``name`` samples in exposition ``text`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class FlakyPeer:
    """A port that stalls every connection (reads, answers nothing: a connect timeout for a
    mesh client) until :meth:`relay_to` a real port, whose connections it then relays."""

    def __init__(self) -> None:
        self.target: int | None = None
        self.relayed = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def relay_to(self, port: int | None) -> None:
        self.target = port

    async def _peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.target is None:
            await reader.read(-1)
            writer.close()
            return
        self.relayed += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.append(up_writer)
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        writer.close()
        up_writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FlakyPeer]:
        self._server = await asyncio.start_server(self._peer, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            for w in self._writers:
                w.close()
            await asyncio.sleep(0.05)  # the relays see EOF and end


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copies to EOF, then half-closes (the other direction may still be answering)."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.write_eof()


@dataclass
class StalledBesideLive:
    """A mesh whose service ``api`` has two endpoints: ``stalled`` (a peer that stalls the
    handshake until :meth:`FlakyPeer.relay_to`) and ``live`` (the server proxy)."""

    mesh: Mesh
    outbound: Outbound
    flaky: FlakyPeer
    live: Endpoint
    stalled: Endpoint


@contextlib.asynccontextmanager
async def stalled_beside_live(pki: Any, connect_timeout: float) -> AsyncIterator[StalledBesideLive]:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with (
        FlakyPeer().running() as flaky,
        run_app() as app_port,
        run_mesh(web, api, app_port=app_port) as mesh,
    ):
        out = mesh.client.outbound
        assert out is not None
        out.connector.connect_timeout = connect_timeout
        live = Endpoint("127.0.0.1", app_port, api.identity, mesh.server.port("inbound"))
        stalled = Endpoint("127.0.0.1", app_port, api.identity, flaky.port)
        yield StalledBesideLive(mesh, out, flaky, live, stalled)


def settled(mesh: Mesh, service: str, *endpoints: Endpoint) -> bool:
    """Whether no request is pending on ``endpoints`` in the client's balancer of ``service``
    (every try was completed, or taken back, exactly once)."""
    out, svc = mesh.client.outbound, mesh.routes.by_name(service)
    assert out is not None and svc is not None
    balancer = out.balancer(svc, out.clock())
    return all(balancer.state(ep).pending == 0 for ep in endpoints)
