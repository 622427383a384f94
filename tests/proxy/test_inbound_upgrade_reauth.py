"""Upgraded HTTP connections (WebSocket) under a changing inbound policy, through real proxies
(client proxy web -> mesh TLS -> server proxy api -> application) with a real WebSocket
client: after the 101 the connection is an opaque relay, and it must still lose what a
policy change takes away, as open TCP relays do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from proxy_mesh import Mesh, run_app, run_mesh, sample
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.inbound import Inbound
from proxy.policy import Authorization, DefaultPolicy, HttpRoute, InboundPolicy, Server
from proxy.routes import Endpoint, Service

pytestmark = pytest.mark.timeout(30)

OPS = "ops.infra.serviceaccount.identity.trustmesh.cluster.local"
DEADLINE = 10.0  # seconds for any one thing the proxies are expected to do


def _inbound(mesh: Mesh) -> Inbound:
    inbound = mesh.server.inbound
    assert inbound is not None
    inbound.reauthorize_interval = 0.05  # the production second would only slow the tests
    return inbound


@contextlib.asynccontextmanager
async def _websocket(mesh: Mesh, authority: str, target: str) -> AsyncIterator[ClientConnection]:
    """A WebSocket to ``authority`` (a service name) through the client proxy's outbound port."""
    async with connect(
        f"ws://{authority}{target}",
        host="127.0.0.1",
        port=mesh.outbound,
        proxy=None,
        open_timeout=DEADLINE,
        close_timeout=1,
    ) as ws:
        yield ws


async def _echoes(ws: ClientConnection, text: str) -> None:
    await ws.send(text)
    async with asyncio.timeout(DEADLINE):
        assert await ws.recv() == "echo:" + text


async def _closed(ws: ClientConnection) -> None:
    """The proxy closes ``ws``: without a close frame, so the client sees an abnormal close."""
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
    assert info.value.rcvd is None  # no close frame: the application did not end it


async def _until(what: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not what():
            await asyncio.sleep(0.02)


def _denied(mesh: Mesh, server: str, reason: str) -> int:
    text = mesh.server.metrics.render()
    if reason == "no_route":
        return int(sample(text, "inbound_http_route_not_found_total", srv_name=server))
    return int(sample(text, "inbound_http_authz_deny_total", srv_name=server, reason=reason))


async def test_a_revoked_server_authorization_closes_an_open_websocket(pki) -> None:
    """Two applications, one WebSocket each. A change that revokes web on one port and only
    adds a client on the other closes the first socket and leaves the second echoing; once
    both are gone nothing is left watched and the periodic check stops."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as kept_port, run_app() as revoked_port:
        web_only = (Authorization("web", (web.identity,)),)
        policy = InboundPolicy(
            DefaultPolicy.DENY,
            (Server("kept", kept_port, web_only), Server("revoked", revoked_port, web_only)),
        )
        async with run_mesh(web, api, app_port=kept_port, policy=policy) as mesh:
            inbound = _inbound(mesh)
            # a second service through the same server proxy, to the second application
            served = mesh.routes.by_name("api")
            assert served is not None
            other = Endpoint("127.0.0.1", revoked_port, api.identity, mesh.server.port("inbound"))
            mesh.routes.replace((served, Service("other", (other,))))
            async with (
                _websocket(mesh, "api", "/ws") as kept,
                _websocket(mesh, "other", "/ws") as revoked,
            ):
                await _echoes(kept, "one")
                await _echoes(revoked, "one")
                assert inbound.relays_watched == 2 and inbound.reauthorizing
                ops = Authorization("ops", (OPS,))
                mesh.server_policy.update(
                    InboundPolicy(
                        DefaultPolicy.DENY,
                        (
                            Server("kept", kept_port, (ops, *web_only)),
                            Server("revoked", revoked_port, (ops,)),
                        ),
                    )
                )
                await _closed(revoked)
                # the same check judged both: the kept socket survived it
                await _echoes(kept, "two")
                assert _denied(mesh, "revoked", "unauthorized") == 1
                assert _denied(mesh, "kept", "unauthorized") == 0
            # closed by the client: no longer watched, and the timer stops
            await _until(lambda: inbound.relays_watched == 0 and not inbound.reauthorizing)


async def test_a_route_level_change_closes_the_websockets_of_that_route(pki) -> None:
    """Routes pick on the query: room a and room b. Revoking web on room b's route closes
    that socket only; removing room a's route then closes the other as not found."""
    web, api = pki.credentials("web"), pki.credentials("api")

    def route(room: str, *authz: Authorization) -> HttpRoute:
        match = HttpMatch(PathMatch("Exact", "/ws"), query_params=(ValueMatch("room", room),))
        return HttpRoute(f"room-{room}", (match,), authz)

    web_authz = Authorization("web", (web.identity,))
    ops_authz = Authorization("ops", (OPS,))
    async with run_app() as app_port:

        def policy(*routes: HttpRoute) -> InboundPolicy:
            return InboundPolicy(DefaultPolicy.DENY, (Server("app", app_port, (), routes),))

        start = policy(route("a", web_authz), route("b", web_authz))
        async with run_mesh(web, api, app_port=app_port, policy=start) as mesh:
            inbound = _inbound(mesh)
            async with (
                _websocket(mesh, "api", "/ws?room=a") as room_a,
                _websocket(mesh, "api", "/ws?room=b") as room_b,
            ):
                await _echoes(room_a, "one")
                await _echoes(room_b, "one")
                mesh.server_policy.update(policy(route("a", web_authz), route("b", ops_authz)))
                await _closed(room_b)
                await _echoes(room_a, "two")
                assert _denied(mesh, "app", "unauthorized") == 1
                mesh.server_policy.update(policy(route("b", web_authz)))
                await _closed(room_a)
                assert _denied(mesh, "app", "no_route") == 1
                assert inbound.relays_watched == 0
            await _until(lambda: not inbound.reauthorizing)


async def test_an_upgrade_answered_after_a_revocation_is_judged_under_the_new_policy(
    pki,
) -> None:
    """The application answers 101 only after the policy revoked the client: the request
    was authorized under the old policy, so the relay must be checked under the new one
    (not taken as checked because the policy had not changed since it started)."""
    web, api = pki.credentials("web"), pki.credentials("api")
    asked, answer, app_closed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def late_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        await answer.wait()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
        app_closed.set()
        writer.close()

    app = await asyncio.start_server(late_upgrade, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    allow = Server("app", app_port, (Authorization("web", (web.identity,)),))
    try:
        policy = InboundPolicy(DefaultPolicy.DENY, (allow,))
        async with run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
            _inbound(mesh)
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
            try:
                async with asyncio.timeout(DEADLINE):
                    writer.write(
                        b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n"
                    )
                    await asyncio.wait_for(asked.wait(), DEADLINE)
                    mesh.server_policy.update(
                        InboundPolicy(DefaultPolicy.DENY, (Server("app", app_port),))
                    )
                    answer.set()
                    with contextlib.suppress(ConnectionError):
                        while await reader.read(65536):
                            pass  # the 101 (or not: the reset may overtake it), then the end
                    await app_closed.wait()  # the relay's application side closed too
            finally:
                writer.close()
            assert _denied(mesh, "app", "unauthorized") == 1
    finally:
        app.close()
