"""Route authorization through real proxies (client proxy web -> server proxy api -> aiohttp
application): what the application ends up serving is what the policy authorized."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import pytest
from proxy_mesh import raw_exchange, run_app, run_mesh, sample
from test_meshtls_inbound import tls_exchange
from test_meshtls_protocol import RawClient

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.policy import Authorization, DefaultPolicy, HttpRoute, InboundPolicy, Server
from proxy.transport_header import SessionProtocol, TransportHeader

pytestmark = pytest.mark.timeout(30)

OPS = "ops.infra.serviceaccount.identity.trustmesh.cluster.local"


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: api\r\n%bConnection: close\r\n\r\n" % (target, extra)


async def test_an_encoded_path_does_not_reach_a_route_the_client_is_not_authorized_for(
    pki,
) -> None:
    """/echo is for ops only, the rest for web. aiohttp decodes /%65cho to /echo: the proxy
    must not take it for a path of the rest."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port:
        server = Server(
            "app",
            app_port,
            (),
            (
                HttpRoute(
                    "echo",
                    (HttpMatch(PathMatch("Exact", "/echo")),),
                    (Authorization("ops", (OPS,)),),
                ),
                HttpRoute(
                    "rest",
                    (HttpMatch(PathMatch("PathPrefix", "/")),),
                    (Authorization("web", (web.identity,)),),
                ),
            ),
        )
        policy = InboundPolicy(DefaultPolicy.DENY, (server,))
        async with run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
            assert (await raw_exchange(mesh.outbound, _get(b"/echo"))).startswith(b"HTTP/1.1 403")
            for target in (b"/%65cho", b"/%65%63%68%6f", b"/x/%2e%2e/echo", b"/echo#x"):
                reply = await raw_exchange(mesh.outbound, _get(target))
                assert reply.startswith(b"HTTP/1.1 403"), (target, reply)
                assert b"route echo" in reply
            # the rest still serves web (aiohttp answers 404 for a path it has no handler for)
            assert (await raw_exchange(mesh.outbound, _get(b"/other"))).startswith(b"HTTP/1.1 404")
            assert "request_total" in mesh.server.metrics.render()
            assert (
                "x-client-id" not in (await raw_exchange(mesh.outbound, _get(b"/other"))).decode()
            )


async def test_a_header_the_client_declares_hop_by_hop_does_not_choose_the_route(pki) -> None:
    """``Connection: x-canary`` makes the proxy drop x-canary before the application: the
    route that matches on it must not be chosen on its strength."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port:
        canary = HttpMatch(PathMatch("Exact", "/echo"), headers=(ValueMatch("x-canary", "1"),))
        server = Server(
            "app",
            app_port,
            (),
            (
                HttpRoute("canary", (canary,), (Authorization("anyone", ("*",)),)),
                HttpRoute(
                    "rest",
                    (HttpMatch(PathMatch("PathPrefix", "/")),),
                    (Authorization("ops", (OPS,)),),
                ),
            ),
        )
        policy = InboundPolicy(DefaultPolicy.DENY, (server,))
        # A client of its own making (a proxy would drop x-canary itself) straight to the
        # server proxy's inbound port.
        client = RawClient(pki.bundle.pem(), creds=web)
        header = TransportHeader(app_port, None, SessionProtocol.HTTP1).encode()
        async with run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
            inbound = mesh.server.port("inbound")
            request = header + _get(b"/echo", b"x-canary: 1\r\n")
            reply = await tls_exchange(inbound, client, api.identity, request)
            assert reply.startswith(b"HTTP/1.1 200"), reply
            hidden = b"x-canary: 1\r\nConnection: x-canary\r\n"
            reply = await tls_exchange(
                inbound, client, api.identity, header + _get(b"/echo", hidden)
            )
            assert reply.startswith(b"HTTP/1.1 403"), reply
            assert b"route rest" in reply


async def test_a_revoked_authorization_applies_to_the_next_request_on_an_open_connection(
    pki,
) -> None:
    """HTTP is authorized per request: a policy update reaches requests on connections that
    were opened (and authorized) before it, as in Linkerd."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port:
        allow = Server("app", app_port, (Authorization("web", (web.identity,)),))
        async with (
            run_mesh(
                web, api, app_port=app_port, policy=InboundPolicy(DefaultPolicy.DENY, (allow,))
            ) as mesh,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http,
        ):
            url = f"http://127.0.0.1:{mesh.outbound}/echo"
            async with http.get(url, headers={"Host": "api"}) as resp:
                assert resp.status == 200
                assert resp.headers["x-client-id"] == web.identity
            mesh.server_policy.update(InboundPolicy(DefaultPolicy.DENY, (Server("app", app_port),)))
            async with http.get(url, headers={"Host": "api"}) as resp:
                assert resp.status == 403
                assert resp.headers["l5d-proxy-error"] == "server app denies every client"
            metrics = mesh.server.metrics.render()
            # one mesh connection carried both requests
            opened = [
                line
                for line in metrics.splitlines()
                if line.startswith('tcp_open_total{direction="inbound",peer="src"')
            ]
            assert len(opened) == 1 and opened[0].endswith(" 1"), opened
            assert (
                sample(
                    metrics, "inbound_http_authz_deny_total", srv_name="app", reason="unauthorized"
                )
                == 1
            )


async def test_the_transport_header_cannot_name_the_proxys_own_ports(pki) -> None:
    """A meshed client names the target port in the transport header. Without a configured
    list of application ports, naming the proxy's own outbound listener would make this
    proxy a relay that speaks for its identity; naming its inbound port, a loop."""
    web, api = pki.credentials("web"), pki.credentials("api")
    client = RawClient(pki.bundle.pem(), creds=web)
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        inbound = mesh.server.port("inbound")
        for own in (mesh.server.port("outbound"), inbound):
            header = TransportHeader(own, None, SessionProtocol.HTTP1).encode()
            try:
                reply = await tls_exchange(inbound, client, api.identity, header + _get(b"/echo"))
            except ConnectionError:
                reply = b""
            assert reply == b"", (own, reply)
        header = TransportHeader(app_port, None, SessionProtocol.HTTP1).encode()
        reply = await tls_exchange(inbound, client, api.identity, header + _get(b"/echo"))
        assert reply.startswith(b"HTTP/1.1 200")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def test_a_revoked_authorization_closes_open_tcp_connections(pki) -> None:
    """Linkerd re-checks an open TCP connection when the policy changes and closes it once
    it is no longer authorized; connections still authorized stay open."""
    web, api = pki.credentials("web"), pki.credentials("api")
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    tcp_port = server.sockets[0].getsockname()[1]
    allow = Server("echo", tcp_port, (Authorization("web", (web.identity,)),))
    try:
        async with run_mesh(
            web,
            api,
            app_port=tcp_port,
            tcp_port=tcp_port,
            policy=InboundPolicy(DefaultPolicy.DENY, (allow,)),
        ) as mesh:
            assert mesh.server.inbound is not None
            mesh.server.inbound.reauthorize_interval = 0.05
            upstream = mesh.client.port("upstream:tcp-echo")
            reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
            async with asyncio.timeout(10):
                writer.write(b"one")
                assert await reader.readexactly(3) == b"one"
                # an unrelated change that still authorizes web keeps the connection
                also = Authorization("ops", (OPS,))
                still = Server("echo", tcp_port, (also, *allow.authorizations))
                mesh.server_policy.update(InboundPolicy(DefaultPolicy.DENY, (still,)))
                await asyncio.sleep(0.2)
                writer.write(b"two")
                assert await reader.readexactly(3) == b"two"
                mesh.server_policy.update(
                    InboundPolicy(DefaultPolicy.DENY, (Server("echo", tcp_port, (also,)),))
                )
                assert await reader.read(-1) == b""
            writer.close()
            text = mesh.server.metrics.render()
            assert sample(text, "inbound_tcp_authz_deny_total", srv_name="echo") == 1
    finally:
        server.close()


async def test_an_h2c_offer_is_declined_and_every_request_after_it_is_authorized(
    pki, caplog
) -> None:
    """After an upgrade to h2c an application speaks HTTP/2 on the connection and the proxy
    would only relay bytes: every request after the first would escape per-request
    authorization. The proxy drops the offer, as Linkerd's does: the request goes on as plain
    HTTP/1.1 (the app never sees ``Upgrade``), and the request pipelined behind it is judged
    on its own. An app that switches protocols anyway, on a request that offered no upgrade,
    gets its answer turned into a 502, not relayed."""
    web, api = pki.credentials("web"), pki.credentials("api")
    heads: list[bytes] = []

    async def app_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                heads.append(head)
                if head.startswith(b"GET /public/switch "):  # switches whatever was asked
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: h2c\r\n\r\n"
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    app = await asyncio.start_server(app_handler, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    server = Server(
        "app",
        app_port,
        (),
        (
            HttpRoute(
                "public",
                (HttpMatch(PathMatch("PathPrefix", "/public")),),
                (Authorization("web", (web.identity,)),),
            ),
            HttpRoute(
                "admin",
                (HttpMatch(PathMatch("PathPrefix", "/admin")),),
                (Authorization("ops", (OPS,)),),
            ),
        ),
    )
    client = RawClient(pki.bundle.pem(), creds=web)
    header = TransportHeader(app_port, None, SessionProtocol.HTTP1).encode()
    offer = (
        b"GET /public HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    smuggled = b"GET /admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    try:
        policy = InboundPolicy(DefaultPolicy.DENY, (server,))
        async with run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
            inbound = mesh.server.port("inbound")
            reply = await tls_exchange(inbound, client, api.identity, header + offer + smuggled)
            first, _, second = reply.partition(b"ok")
            assert first.startswith(b"HTTP/1.1 200 OK\r\n"), reply
            assert second.startswith(b"HTTP/1.1 403 Forbidden\r\n"), reply
            (forwarded,) = heads
            assert forwarded.startswith(b"GET /public HTTP/1.1\r\n"), forwarded
            assert b"h2c" not in forwarded.lower() and b"http2-settings" not in forwarded.lower()
            text = mesh.server.metrics.render()
            assert sample(text, "inbound_http_route_not_found_total") == 0
            denied = sample(
                text, "inbound_http_authz_deny_total", route_name="admin", reason="unauthorized"
            )
            assert denied == 1

            reply = await tls_exchange(
                inbound,
                client,
                api.identity,
                header + b"GET /public/switch HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
            )
            assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), reply
            assert b"the upstream switched protocols on a request that offered none" in reply
            assert b"101" not in reply
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors == [], errors
    finally:
        app.close()
