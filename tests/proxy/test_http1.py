"""HTTP/1.1 through two real proxies with mesh TLS between them, to a real aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import struct
import threading
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from loopback import unused_port
from proxy_mesh import (
    behind_the_mesh,
    raw_exchange,
    run_app,
    run_mesh,
    sample,
    stalled_beside_live,
)

import proxy.inbound as inbound_module
from destination.policy import HttpMatch, PathMatch, ValueMatch
from pki.certs import issue_identity
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from proxy.errors import UpstreamError
from proxy.http1 import MAX_DROPPED_BODY, MAX_HEAD_BYTES, MAX_HEADERS, MAX_PIPELINED, Http1Server
from proxy.listener import serve
from proxy.meshtls import MeshCredentials, MeshTls, StaticCredentials
from proxy.policy import Authorization, DefaultPolicy, HttpRoute, InboundPolicy, Server
from proxy.routes import Endpoint, Service
from proxy.settings import HEAD_TIMEOUT

pytestmark = pytest.mark.timeout(60)


async def test_get_keepalive_pooling_and_client_id(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                async with http.get(
                    f"http://127.0.0.1:{mesh.outbound}/echo", headers={"Host": "api.local"}
                ) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-client-id"] == web.identity
                    assert await resp.read() == b""
        text = mesh.client.metrics.render()
        assert (
            'tls_handshakes_total{direction="outbound",group="X25519MLKEM768",result="ok"} 1'
            in text
        )
        assert (
            f'request_total{{direction="outbound",authority="api.local",tls="true",server_id="{api.identity}"}} 5'
            in text
        )
        assert (
            'response_latency_ms_bucket{direction="outbound",authority="api.local",status_code="200",le="+Inf"} 5'
            in text
        )
        server_text = mesh.server.metrics.render()
        assert f'client_id="{web.identity}"' in server_text


async def test_clients_cannot_make_metrics_series_without_end(
    pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The authority label came from the Host header as sent: every case or port variant of a
    service name, and every unknown name refused with 404, made a new series (memory and
    Prometheus cardinality without bound). Now outbound: the service's own names, and one
    series for what was refused before routing; inbound: lower case, and a bounded number of
    values (the app may serve any Host), the rest counted without the label."""
    monkeypatch.setattr(inbound_module, "MAX_AUTHORITY_LABELS", 10)
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        async with aiohttp.ClientSession() as http:
            for i in range(60):
                variant = "".join(
                    c.upper() if (i >> n) & 1 else c for n, c in enumerate("api.local")
                )
                for host in (variant, f"api.local:{1000 + i}", f"unknown-{i}.example"):
                    async with http.get(
                        f"http://127.0.0.1:{mesh.outbound}/echo", headers={"Host": host}
                    ) as resp:
                        assert resp.status == (404 if host.startswith("unknown") else 200)
        text = mesh.client.metrics.render()
        lines = [
            ln for ln in text.splitlines() if ln.startswith('request_total{direction="outbound"')
        ]
        assert len(lines) == 3, lines
        assert 'request_total{direction="outbound"} 60' in lines  # refused: no authority label
        assert any('authority="api.local"' in ln and ln.endswith(" 60") for ln in lines)
        assert any('authority="api",' in ln and ln.endswith(" 60") for ln in lines)
        served = [
            ln for ln in mesh.server.metrics.render().splitlines()
            if ln.startswith('request_total{direction="inbound"')
        ]  # fmt: skip
        labels = {
            ln.split('authority="')[1].split('"')[0] if "authority=" in ln else "" for ln in served
        }
        assert len(labels) == 11 and "" in labels and "api.local" in labels, labels
        assert all(label == label.lower() for label in labels)
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in served) == 120


async def test_streamed_bodies_both_framings(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    body = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        url = f"http://127.0.0.1:{mesh.outbound}/echo"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "?chunked=1", data=chunks(), headers={"Host": "api"}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["x-te"] == "chunked"  # the app saw a chunked request
                assert await resp.read() == body
            async with http.put(url, data=body, headers={"Host": "api"}) as resp:
                assert resp.headers["x-te"] == "-"
                assert resp.headers["content-length"] == str(len(body))
                assert await resp.read() == body
            async with http.get(
                f"http://127.0.0.1:{mesh.outbound}/stream?n=500", headers={"Host": "api"}
            ) as resp:
                lines = (await resp.read()).splitlines()
                assert lines[0] == b"part 0" and lines[-1] == b"part 499"
            async with http.head(url, headers={"Host": "api"}) as resp:
                assert resp.status == 200 and resp.headers["x-method"] == "HEAD"


async def test_pipelined_requests_and_hop_by_hop_headers(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        req = (
            b"POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n"
            b"Connection: keep-alive, x-secret\r\nx-secret: 1\r\nl5d-client-id: forged\r\n\r\nhello"
            b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        reply = await raw_exchange(mesh.outbound, req)
        assert reply.count(b"HTTP/1.1 200") == 2
        assert reply.index(b"hello") < reply.rindex(b"HTTP/1.1 200")
        assert b"forged" not in reply and web.identity.encode() in reply


async def test_websocket_upgrade(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with (
        run_app() as app_port,
        run_mesh(web, api, app_port=app_port) as mesh,
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://127.0.0.1:{mesh.outbound}/ws", headers={"Host": "api"}) as ws,
    ):
        for i in range(3):
            await ws.send_str(f"m{i}")
            assert (await ws.receive(timeout=5)).data == f"echo:m{i}"


async def test_policy_denial_gets_403_with_reason(pki, caplog) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    policy = InboundPolicy(DefaultPolicy.DENY)
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port, policy=policy) as mesh:
        with caplog.at_level(logging.INFO, logger="proxy.http1"):
            reply = await raw_exchange(
                mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
            )
        assert reply.startswith(b"HTTP/1.1 403 Forbidden")
        assert b"l5d-proxy-error: server default:deny denies every client" in reply
        # The inbound proxy says so in its log, naming the client; the outbound proxy, which
        # relayed the 403, says nothing.
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy.http1"]
        assert lines == [
            f"inbound on port {app_port} from {web.identity} (127.0.0.1) GET request to 'api' "
            "answered 403: server default:deny denies every client"
        ]
        # Only another identity is authorized on the app port: still denied, reason names us.
        mesh.server_policy.update(
            InboundPolicy(
                DefaultPolicy.DENY,
                servers=(
                    Server(
                        "app", app_port, (Authorization("ops", (pki.credentials("ops").identity,)),)
                    ),
                ),
            )
        )
        reply = await raw_exchange(
            mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 403") and web.identity.encode() in reply
        text = mesh.server.metrics.render()
        for server in ("default:deny", "app"):
            denied = {"srv_name": server, "client_id": web.identity, "reason": "unauthorized"}
            assert sample(text, "inbound_http_authz_deny_total", **denied) == 1, server


async def test_httproute_authorizations_and_unmatched_requests(pki) -> None:
    """A Server with HTTPRoutes decides per request: the matched route's authorizations are
    added to the server's; a request no route matches gets 404."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port:
        server = Server(
            "app",
            app_port,
            (),  # nobody at server level
            (
                HttpRoute(
                    "echo",
                    (HttpMatch(PathMatch("PathPrefix", "/echo"), method="GET"),),
                    (Authorization("web-only", (web.identity,)),),
                ),
                HttpRoute(
                    "canary",
                    (
                        HttpMatch(
                            PathMatch("Exact", "/echo"), headers=(ValueMatch("x-canary", "1"),)
                        ),
                    ),
                ),
            ),
        )
        policy = InboundPolicy(DefaultPolicy.DENY, servers=(server,))
        async with run_mesh(web, api, app_port=app_port, policy=policy) as mesh:

            async def get(request: bytes) -> bytes:
                return await raw_exchange(mesh.outbound, request)

            ok = await get(b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200")
            assert f"x-client-id: {web.identity}".encode() in ok  # the app saw l5d-client-id
            # The more specific canary route matches and authorizes nobody: 403, named.
            canary = await get(
                b"GET /echo HTTP/1.1\r\nHost: api\r\nX-Canary: 1\r\nConnection: close\r\n\r\n"
            )
            assert canary.startswith(b"HTTP/1.1 403")
            assert b"route canary" in canary
            missing = await get(
                b"POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            assert missing.startswith(b"HTTP/1.1 404")
            assert b"no HTTPRoute of server app matches POST /echo" in missing
            metrics = mesh.server.metrics.render()
            assert sample(metrics, "inbound_http_route_not_found_total", srv_name="app") == 1
            assert (
                sample(
                    metrics,
                    "inbound_http_authz_allow_total",
                    target_port=str(app_port),
                    srv_name="app",
                    tls="true",
                    client_id=web.identity,
                    authz_name="web-only",
                )
                == 1
            )


async def test_unknown_authority_wrong_identity_and_dead_endpoint(pki, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.http1")
    web, api = pki.credentials("web"), pki.credentials("api")
    other = pki.credentials("db").identity
    async with (
        run_app() as app_port,
        run_mesh(web, api, app_port=app_port, expected_identity=other) as mesh,
    ):
        reply = await raw_exchange(
            mesh.outbound, b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 404") and b"l5d-proxy-error" in reply
        assert "outbound GET request to 'nowhere' answered 404: no service is known for " in (
            caplog.text
        )
        reply = await raw_exchange(
            mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        # The real peer proxy refuses an SNI that is not its identity.
        assert reply.startswith(b"HTTP/1.1 502") and b"during the handshake" in reply
        # A rogue peer that accepts any SNI is refused by the client's own SAN check.
        rogue_tls = MeshTls(StaticCredentials(api))
        rogue = await serve("127.0.0.1", 0, lambda link: link.start_tls(rogue_tls.server_session()))
        try:
            port = rogue.sockets[0].getsockname()[1]
            mesh.routes.replace(
                (
                    Service("api", (Endpoint("127.0.0.1", app_port, other, port),)),
                    Service("direct", (Endpoint("127.0.0.1", app_port),)),
                )
            )
            reply = await raw_exchange(
                mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
            )
        finally:
            rogue.close()
        assert reply.startswith(b"HTTP/1.1 502")
        assert f"presented {api.identity}, not the expected {other}".encode() in reply
        assert 'result="identity_mismatch"' in mesh.client.metrics.render()
        # An unmeshed endpoint is dialled directly.
        reply = await raw_exchange(
            mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: direct\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200") and b"x-client-id: -" in reply


async def test_an_endpoint_refusing_connections_is_passed_over(pki, caplog) -> None:
    """A refused connection sent nothing of the request, so another endpoint takes it (as
    Linkerd's balancer holds such an endpoint unready): a workload starting or going away
    behind a service costs no request a 502."""
    caplog.set_level(logging.INFO, logger="proxy.outbound")
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        live = Endpoint("127.0.0.1", app_port, api.identity, mesh.server.port("inbound"))
        dead = [Endpoint("127.0.0.1", app_port, api.identity, unused_port()) for _ in range(3)]
        mesh.routes.replace((Service("api", (*dead, live)),))
        for _ in range(30):  # a new connection each: an endpoint choice and a dial each
            reply = await raw_exchange(
                mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert "; trying another endpoint of api" in caplog.text
        text = mesh.client.metrics.render()
        assert sample(text, "request_total", direction="outbound", authority="api") == 30
        assert sample(text, "response_total", direction="outbound", status_code="200") == 30
        # Only when every endpoint refuses is the request answered 502.
        mesh.routes.replace((Service("api", tuple(dead)),))
        reply = await raw_exchange(
            mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 502") and b"connecting to 127.0.0.1:" in reply


async def test_an_endpoint_that_times_out_is_reconnected_in_the_background(pki, caplog) -> None:
    """An endpoint whose connections time out (a stalled or blackholed peer) costs one request
    one connect timeout, not one every backoff: it stays out of the picks while the proxy
    reconnects in the background, and is back as soon as a reconnection succeeds, with the
    connection it opened pooled for the next request. The request that failed over is charged
    to the endpoint that answered from when that one was picked: else one slow failure would
    make a healthy endpoint look slow."""
    caplog.set_level(logging.INFO, logger="proxy.outbound")
    request = b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    async with stalled_beside_live(pki, connect_timeout=0.3) as s:
        mesh, out, flaky, live, stalled = s.mesh, s.outbound, s.flaky, s.live, s.stalled
        svc = Service("api", (stalled, live))
        mesh.routes.replace((svc,))
        balancer = out.balancer(svc, out.clock())
        # Every pick prefers the stalled endpoint whenever it is in the picks (as a fast
        # endpoint would beside a slow one that is busy).
        balancer.state(live).pending = 1000
        started = time.monotonic()
        reply = await raw_exchange(mesh.outbound, request)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert time.monotonic() - started >= 0.3  # the first request found out
        assert balancer.state(stalled).failures == 1
        assert balancer.state(live).rtt < 0.25
        # For the next 1.5 s (several backoffs and reconnection timeouts), no request waits.
        slowest, deadline = 0.0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = await raw_exchange(mesh.outbound, request)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.02)
        assert slowest < 0.25, slowest
        assert balancer.is_down(stalled) and balancer.state(stalled).failures >= 3
        assert "is out of the balancer until a reconnection succeeds" in caplog.text
        # The peer recovers: a reconnection gets through and puts it back in the picks.
        flaky.relay_to(mesh.server.port("inbound"))
        for _ in range(100):
            if not balancer.is_down(stalled):
                break
            await asyncio.sleep(0.02)
        assert not balancer.is_down(stalled)
        assert "is back in the balancer (reconnected after" in caplog.text
        assert flaky.relayed == 1 and out.pool.idle_count(stalled) == 1  # the probe's link
        started = time.monotonic()
        reply = await raw_exchange(mesh.outbound, request)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert time.monotonic() - started < 0.25
        assert flaky.relayed == 1  # the request took the pooled connection
        # A stopping proxy stops reconnecting.
        flaky.relay_to(None)
        out.failed(balancer, stalled, UpstreamError("test"), pooled=True)
        assert len(out._probes) == 1
    assert not out._probes


async def test_malformed_request_gets_400(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        reply = await raw_exchange(mesh.outbound, b"GET / HTTP/1.1\r\nHost api\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")


async def test_admin_endpoints(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        admin = mesh.client.port("admin")
        async with aiohttp.ClientSession() as http:
            for path, status, text in (("/live", 200, "live\n"), ("/ready", 200, "ready\n")):
                async with http.get(f"http://127.0.0.1:{admin}{path}") as resp:
                    assert (resp.status, await resp.text()) == (status, text)
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                assert "# TYPE response_latency_ms histogram" in await resp.text()
        await asyncio.sleep(0)


_RAW_REPLIES = {
    b"HEAD /h": b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-kind: head\r\n\r\n",
    b"GET /g": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-kind: get\r\n\r\nabc",
    b"GET /c": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: x-hop\r\n"
    b"x-hop: 1\r\nx-keep: 2\r\ncontent-length: 2\r\n\r\nok",
}


async def test_upstream_connection_reused_after_head_interim_and_connection_tokens(pki) -> None:
    """One pooled app connection answers HEAD (length announced, no body), an interim 100 and
    a response whose Connection header names another header: each reply arrives intact."""
    accepted = 0

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                writer.write(_RAW_REPLIES[b" ".join(head.split(b" ")[:2])])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with behind_the_mesh(pki, app) as mesh:
        req = b"".join(
            b"%s HTTP/1.1\r\nHost: api\r\n\r\n" % r for r in (b"HEAD /h", b"GET /g", b"GET /c")
        )
        reply = await raw_exchange(
            mesh.outbound, req + b"GET /g HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
    parts = reply.split(b"HTTP/1.1 ")[1:]
    assert len(parts) == 5, reply
    assert parts[0].startswith(b"200") and b"x-kind: head" in parts[0]
    assert parts[0].endswith(b"\r\n\r\n")  # no body after the HEAD answer
    assert parts[1].startswith(b"200") and parts[1].endswith(b"\r\n\r\nabc")
    assert parts[2].startswith(b"100 Continue\r\n\r\n")
    assert b"x-keep: 2" in parts[3] and b"x-hop" not in parts[3] and parts[3].endswith(b"ok")
    assert parts[4].endswith(b"abc") and b"connection: close" in parts[4]
    assert accepted == 1


_SMUGGLING = [
    # (request after the request line, what the 400's l5d-proxy-error names)
    (b"Host: api\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     b"Transfer-Encoding can't be present with Content-Length"),
    (b"Host: api\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     b"Content-Length can't be present with Transfer-Encoding"),
    (b"Host: api\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
     b"Duplicate Content-Length"),
    (b"Host: api\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
     b"Transfer-Encoding"),
    (b"Host: api\r\nTransfer-Encoding: identity\r\n\r\nabc", b"Transfer-Encoding"),
    (b"Host: api\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", b"header field char"),
    (b"Host: api\r\nX-A: 1\r\n folded\r\n\r\n", b"whitespace"),
    (b"Host: api\r\nHost: other\r\n\r\n", b"more than one Host header"),
    (b"Host: api\r\nX-A: a\x00b\r\n\r\n", b"header value char"),
    (b"Host: api\r\nContent-Length: -1\r\n\r\n", b"Content-Length"),
    (b"Content-Length: 0\r\n\r\n", b"an HTTP/1.1 request needs a Host header"),
]  # fmt: skip


class _RawApp:
    """An app on raw sockets that records every request head it receives and answers by
    path: ``/te`` with Transfer-Encoding ``gzip, chunked``, ``/eof`` with ``gzip`` to EOF."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                if b"chunked" in head.lower():
                    await reader.readuntil(b"0\r\n\r\n")
                target = head.split(b" ")[1]  # origin- or absolute-form
                if head.startswith(b"HEAD "):  # with a body, which a HEAD answer must not have
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"4\r\nEVIL\r\n0\r\n\r\n")  # fmt: skip
                elif target.endswith(b"/two"):  # two responses to one request
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")  # fmt: skip
                elif target.endswith(b"/big"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 16384\r\n\r\n"
                                 + b"b" * 16384)  # fmt: skip
                    await writer.drain()
                elif target.endswith(b"/te"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                 b"3\r\nabc\r\n0\r\n\r\n")  # fmt: skip
                elif target.endswith(b"/both"):  # a response two parsers frame differently
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
                elif target.endswith(b"/huge-head"):  # a response head that never ends
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
                    for _ in range(100):
                        writer.write(b"b" * 4096)
                        await writer.drain()
                elif b"/fields/" in target:  # a response with that many header fields
                    n = int(target.rpartition(b"/")[2])
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 + b"".join(b"X-%d: v\r\n" % i for i in range(n - 1))
                                 + b"\r\nok")  # fmt: skip
                elif target.endswith(b"/eof"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz")
                    writer.close()
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_smuggling_and_ambiguous_requests_are_refused_by_name(pki) -> None:
    """Requests two HTTP parsers could frame or route differently never reach the app: each
    gets 400 naming the problem, and the proxy goes on serving."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        for rest, named in _SMUGGLING:
            reply = await raw_exchange(mesh.outbound, b"POST /x HTTP/1.1\r\n" + rest)
            head = reply.partition(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.1 400 Bad Request"), (rest, reply)
            assert b"l5d-proxy-error: malformed HTTP/1.1 request: " in head
            assert named in head, (rest, head)
            assert b"connection: close" in head
        reply = await raw_exchange(
            mesh.outbound, b"GET /ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")
    assert len(app.heads) == 1 and app.heads[0].startswith(b"GET /ok ")


async def test_absolute_form_targets_and_the_header_count_limit(pki) -> None:
    """An absolute-form target routes by its authority and the app gets that authority as the
    one Host (RFC 9112 3.2.2), whatever Host came; user information in it, or more than
    MAX_HEADERS header fields, is refused before anything reaches the app."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(
            mesh.outbound,
            b"GET http://api/abs?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok"), reply
        (head,) = app.heads
        assert head.startswith(b"GET http://api/abs?q=1 HTTP/1.1\r\n")
        hosts = [line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")]
        assert hosts == [b"Host: api"], head
        refused = {
            b"GET http://user:pw@api/ HTTP/1.1\r\nHost: api\r\n\r\n": (
                b"400 Bad Request", b"the request target carries user information"),
            b"GET http:///x HTTP/1.1\r\nHost: api\r\n\r\n": (
                b"400 Bad Request", b"the absolute-form request target has no authority"),
            b"GET /many HTTP/1.1\r\nHost: api\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n": (
                b"431 Request Header Fields Too Large",
                b"more than %d header fields" % MAX_HEADERS),
        }  # fmt: skip
        for request, (status, named) in refused.items():
            reply = await raw_exchange(mesh.outbound, request)
            assert reply.startswith(b"HTTP/1.1 " + status), reply
            assert named in reply.partition(b"\r\n\r\n")[0], reply
        # an unknown authority is named in the 404, quoted (not a 60 KB header sent back)
        reply = await raw_exchange(
            mesh.outbound,
            b"GET / HTTP/1.1\r\nHost: " + b"h" * 60_000 + b"\r\nConnection: close\r\n\r\n",
        )
        head = reply.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 404") and len(head) < 400, head[:200]
        assert b"... (60000 characters)" in head
        # exactly the limit passes: Host and 99 others (hop-by-hop fields are not counted)
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1))
        reply = await raw_exchange(
            mesh.outbound,
            b"GET /limit HTTP/1.1\r\nHost: api\r\n" + fields + b"Connection: close\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply
    assert len(app.heads) == 2 and app.heads[1].startswith(b"GET /limit ")


async def test_transfer_codings_are_forwarded_as_they_came(pki) -> None:
    """Chunks are re-framed, but every coding in Transfer-Encoding reaches the other side."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(
            mesh.outbound,
            b"POST /te HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\n"
            b"Connection: close\r\n\r\n4\r\ngzip\r\n0\r\n\r\n",
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply
        assert b"transfer-encoding: gzip, chunked" in head.lower()
        assert body == b"3\r\nabc\r\n0\r\n\r\n"
        # codings split over two fields are one list: gzip was lost when the last field won
        reply = await raw_exchange(
            mesh.outbound,
            b"POST /te HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\ngzip\r\n0\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply
        # absolute-form: the target's authority routes, whatever Host says
        reply = await raw_exchange(
            mesh.outbound,
            b"GET http://api/eof HTTP/1.1\r\nHost: nowhere.example\r\n\r\n",
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply
        assert b"transfer-encoding: gzip" in head.lower() and body == b"xyz"
    assert b"transfer-encoding: gzip, chunked" in app.heads[0].lower()
    te = [ln for ln in app.heads[1].lower().split(b"\r\n") if ln.startswith(b"transfer-encoding")]
    assert te == [b"transfer-encoding: gzip, chunked"], app.heads[1]
    assert app.heads[2].startswith(b"GET http://api/eof ")


async def test_a_malformed_response_is_answered_once_and_the_connection_goes_on(pki) -> None:
    """The upstream's malformed response becomes one 502 (not a second one when the proxy then
    drops that upstream connection), and the client's keep-alive connection serves on."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            writer.write(b"GET /both HTTP/1.1\r\nHost: api\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert first.startswith(b"HTTP/1.1 502 Bad Gateway"), first
            assert b"l5d-proxy-error: the upstream sent a malformed HTTP response" in first
            with pytest.raises(TimeoutError):  # nothing more for that request
                await asyncio.wait_for(reader.read(1), 0.5)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            second = await asyncio.wait_for(reader.read(-1), 10)
            assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"ok"), second
        finally:
            writer.close()


async def test_what_an_upstream_sends_beyond_its_one_response_never_reaches_the_client(
    pki,
) -> None:
    """Bytes after a complete response (a body after a HEAD answer, a second response) were
    relayed: the client took them for the answer to its next request. They are dropped with
    the upstream connection, and the next request gets its own answer."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        for first in (b"GET /two", b"HEAD /head"):
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
            try:
                writer.write(first + b" HTTP/1.1\r\nHost: api\r\n\r\n")
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    if first.startswith(b"GET"):
                        assert await reader.readexactly(2) == b"ok"
                assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
                writer.write(b"GET /next HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(10):
                    rest = await reader.read(-1)
                assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok")
                assert b"EVIL" not in rest, rest
            finally:
                writer.close()
    assert [h.split(b"\r\n")[0] for h in app.heads] == [
        b"GET /two HTTP/1.1", b"GET /next HTTP/1.1", b"HEAD /head HTTP/1.1", b"GET /next HTTP/1.1"
    ]  # fmt: skip


async def test_heads_over_the_limit_are_refused_without_growing_memory(pki) -> None:
    """A request head that keeps coming (one endless header, or URL) gets 431 once it passes
    MAX_HEAD_BYTES and the connection closes; a large head under the limit is forwarded; an
    upstream response head over it, or with more than MAX_HEADERS fields, becomes a 502."""
    app = _RawApp()

    async def endless(start: bytes) -> bytes:
        """Send ``start`` and then 1 MiB more of it, and read the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            writer.write(start)
            for _ in range(64):  # the proxy refuses after 64 KiB and drains the rest
                writer.write(b"a" * 16384)
                await writer.drain()
            return await asyncio.wait_for(reader.read(-1), 10)
        finally:
            writer.close()

    async with behind_the_mesh(pki, app) as mesh:
        for start in (b"GET / HTTP/1.1\r\nHost: api\r\nX-Big: ", b"GET /"):
            reply = await endless(start)
            assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), (
                start,
                reply[:99],
            )
            assert f"request head over {MAX_HEAD_BYTES} bytes".encode() in reply
        assert app.heads == []

        big = b"x" * (MAX_HEAD_BYTES - 1024)
        reply = await raw_exchange(
            mesh.outbound,
            b"GET /ok HTTP/1.1\r\nHost: api\r\nX-Big: %b\r\nConnection: close\r\n\r\n" % big,
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert len(app.heads) == 1 and big in app.heads[0]
        query = b"q=" + b"z" * 4000  # longer than the detection window
        reply = await raw_exchange(
            mesh.outbound,
            b"GET /ok?%b HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n" % query,
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert query in app.heads[1]

        reply = await raw_exchange(
            mesh.outbound, b"GET /huge-head HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 502 Bad Gateway"), reply[:200]
        assert b"response head is over" in reply
        # the response's header fields are bounded as the request's are (hyper does so too)
        for fields, status in ((MAX_HEADERS, b"200"), (MAX_HEADERS + 1, b"502")):
            reply = await raw_exchange(
                mesh.outbound,
                b"GET /fields/%d HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n" % fields,
            )
            assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
        assert b"the upstream's response has more than %d header fields" % MAX_HEADERS in reply


async def test_a_refusal_behind_pipelined_requests_waits_for_their_answers(pki) -> None:
    """A malformed request pipelined behind good ones is refused after their answers, in
    order, and the connection then lingers (half-closed, still draining) instead of resetting.
    A request whose body turns out malformed is dropped, and refused in its turn."""
    app = _RawApp()
    ok = b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n"
    broken_body = b"POST /ok HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    async with behind_the_mesh(pki, app) as mesh:

        async def send(request: bytes) -> list[bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
            try:
                writer.write(request)
                async with asyncio.timeout(5):
                    reply = await reader.read(-1)  # the proxy's half-close ends this read
                    writer.write(b"more bytes after the refusal")  # still drained, not reset
                    await writer.drain()
            finally:
                writer.close()
            return reply.split(b"\r\n\r\n")

        parts = await send(ok * 2 + b"GET /x HTTP/1.1\r\nHost api\r\n\r\n")
        assert [p[:12] for p in parts] == [b"HTTP/1.1 200", b"okHTTP/1.1 2", b"okHTTP/1.1 4", b""]
        assert b"l5d-proxy-error: malformed HTTP/1.1 request: Invalid header token" in parts[2]
        assert len(app.heads) == 2
        for request in (ok + broken_body, broken_body):
            parts = await send(request)
            assert parts[-2].startswith((b"HTTP/1.1 400", b"okHTTP/1.1 400")), parts
            assert b"Invalid character in chunk size" in parts[-2]
            assert len(parts) == 2 + request.count(b"GET")


async def test_an_upstream_reset_inside_a_close_delimited_body_reaches_the_client(pki) -> None:
    """A body delimited by the connection's close ends cleanly on a close, but an upstream
    reset in the middle of it must reach the client as a reset, not as the end of the body."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nthe first part")
        await writer.drain()
        if b"/reset" in head:
            await asyncio.sleep(0.2)  # let the part go ahead of the reset
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        else:
            writer.close()

    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(mesh.outbound, b"GET /close HTTP/1.1\r\nHost: api\r\n\r\n")
        assert reply.endswith(b"connection: close\r\n\r\nthe first part"), reply
        try:
            reply = await raw_exchange(mesh.outbound, b"GET /reset HTTP/1.1\r\nHost: api\r\n\r\n")
        except ConnectionResetError:
            return
        # Only when the reset overtook the part (a loaded machine): the head never came.
        assert reply.startswith(b"HTTP/1.1 502"), reply


async def test_a_request_head_that_never_ends_times_out_with_408(pki) -> None:
    """A client that starts a request head and stalls (slowloris) gets 408 after the head
    timeout, and the connection closes; a keep-alive connection idle between requests, with
    no head started, is not timed out."""
    app = _RawApp()
    async with behind_the_mesh(pki, app) as mesh:
        assert mesh.client.outbound is not None
        assert mesh.client.outbound.head_timeout == HEAD_TIMEOUT == 30.0
        mesh.client.outbound.head_timeout = 0.3
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            writer.write(b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n")
            async with asyncio.timeout(5):
                first = await reader.readuntil(b"ok")
                await asyncio.sleep(0.5)  # idle longer than the timeout: not a stalled head
                writer.write(b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n")
                second = await reader.readuntil(b"ok")
                started = asyncio.get_running_loop().time()
                writer.write(b"GET /ok HTTP/1.1\r\nHost: a")
                third = await reader.read(-1)
                waited = asyncio.get_running_loop().time() - started
        finally:
            writer.close()
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    assert third.startswith(b"HTTP/1.1 408 Request Timeout"), third
    assert b"l5d-proxy-error: the request head was not complete within 0.3s" in third
    assert 0.25 < waited < 2.0
    assert len(app.heads) == 2


async def test_an_early_answer_during_an_upload_reaches_the_client(pki) -> None:
    """The app answers 413 as soon as it has the head of a large upload, then closes as a
    careful server does (half-close, drain). The proxies must hand the answer on the same way:
    closing at once with the rest of the upload unread would reset the client's connection,
    and a client still sending would lose the answer."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
        await writer.drain()
        writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
        writer.close()

    def upload(port: int) -> bytes:
        body = b"x" * (4 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /upload HTTP/1.1\r\nHost: api\r\ncontent-length: %d\r\n\r\n" % len(body)
            )

            def send_body() -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(body)

            sender = threading.Thread(target=send_body)
            sender.start()
            try:
                reply = b""
                while b"big!" not in reply and (part := sock.recv(65536)):
                    reply += part
                return reply
            finally:
                sender.join(10)

    async with behind_the_mesh(pki, app) as mesh:
        for _ in range(3):
            reply = await asyncio.to_thread(upload, mesh.outbound)
            assert reply.startswith(b"HTTP/1.1 413 ") and reply.endswith(b"big!"), reply


async def test_h2c_offers_are_declined_and_the_requests_served_as_http1(pki) -> None:
    """``curl --http2`` offers ``Upgrade: h2c`` on a cleartext request; the proxy drops the
    offer (as Linkerd's does) and the request is served over HTTP/1.1. Offers pipelined in one
    write are each declined in turn (a loop, not a recursion per offer)."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-i", "--http2", "--max-time", "10", "-H", "Host: api",
            f"http://127.0.0.1:{mesh.outbound}/echo?x=1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await curl.communicate()
        assert curl.returncode == 0, err
        assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out
        assert b"\r\nx-method: GET\r\n" in out

        offers = 2_000
        offer = (
            b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        reply = await raw_exchange(
            mesh.outbound,
            offer * offers + b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        assert reply.count(b"HTTP/1.1 200 OK\r\n") == offers + 1, reply[-300:]
        assert b"101" not in reply


async def test_http2_on_the_outbound_port_is_told_to_use_http1(pki) -> None:
    """HTTP/2 is not routed on the outbound port: a client gets a GOAWAY with
    HTTP_1_1_REQUIRED and a reason (RFC 9113), which nghttp (a real HTTP/2 client) reports,
    instead of a bare close."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        nghttp = await asyncio.create_subprocess_exec(
            "nghttp", "-v", "-t", "10", f"http://127.0.0.1:{mesh.outbound}/echo",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await nghttp.communicate()
    text = out.decode()
    assert "recv GOAWAY frame" in text, text
    assert "last_stream_id=0, error_code=HTTP_1_1_REQUIRED(0x0d)" in text, text
    assert "routes HTTP/1.1 only on its outbound port" in text, text


async def test_an_http10_client_that_asks_for_keep_alive_is_told_it_has_it(pki) -> None:
    """An HTTP/1.0 client keeps its connection only if the answer says ``keep-alive``; the
    proxy kept it open but did not say so, so such clients (ab -k) opened one per request."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            for _ in range(3):
                writer.write(b"GET /echo HTTP/1.0\r\nHost: api\r\nConnection: keep-alive\r\n\r\n")
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                assert b"\r\nconnection: keep-alive\r\n" in head, head
                assert b"content-length: 0\r\n" in head.lower(), head
            writer.write(b"GET /echo HTTP/1.0\r\nHost: api\r\n\r\n")  # no keep-alive: closed
            async with asyncio.timeout(10):
                last = await reader.read(-1)
            assert last.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in last, last
        finally:
            writer.close()


async def test_a_refused_request_keeps_both_connections_unless_its_body_is_large(pki) -> None:
    """A request refused before its end (unknown authority, policy) used to close the client
    connection, and at the inbound proxy the pooled mesh connection with it, so every denied
    request cost both proxies a new handshake. Now a request without a body, or with one of
    at most MAX_DROPPED_BODY bytes (read and dropped), keeps both; so does a chunked body
    that ends within MAX_DROPPED_BODY. A larger declared body, or one the client holds back for
    100-continue, closes the client connection (the answer says so); a chunked body that runs
    past MAX_DROPPED_BODY closes it then, after the answer."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        mesh.server_policy.update(InboundPolicy(DefaultPolicy.DENY))

        async def refused(
            request: bytes, status: bytes, *, closes: bool, said: bool = True
        ) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
            try:
                for _ in range(3):
                    writer.write(request)
                    async with asyncio.timeout(10):
                        head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 " + status), (request, head)
                    if closes:
                        assert (b"connection: close\r\n" in head) is said, head
                        async with asyncio.timeout(10):
                            assert await reader.read(-1) == b""
                        return
                    assert b"connection: close" not in head.lower(), head
            finally:
                writer.close()

        small = b"POST /echo HTTP/1.1\r\nHost: %b\r\nContent-Length: 5\r\n\r\nhello"
        for host, status in ((b"api", b"403"), (b"nowhere", b"404")):
            await refused(b"GET /echo HTTP/1.1\r\nHost: %b\r\n\r\n" % host, status, closes=False)
            await refused(small % host, status, closes=False)
        dropped = b"x" * MAX_DROPPED_BODY
        await refused(
            b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: %d\r\n\r\n%b"
            % (len(dropped), dropped), b"404", closes=False,
        )  # fmt: skip
        chunked = b"POST /echo HTTP/1.1\r\nHost: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
        for host, status in ((b"api", b"403"), (b"nowhere", b"404")):
            await refused(chunked % host + b"5\r\nhello\r\n0\r\n\r\n", status, closes=False)
        big = b"%x\r\n%b\r\n" % (MAX_DROPPED_BODY, b"x" * MAX_DROPPED_BODY)
        await refused(chunked % b"nowhere" + big, b"404", closes=True, said=False)
        for request in (
            b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: %d\r\n\r\n"
            % (MAX_DROPPED_BODY + 1),
            b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n",
        ):
            await refused(request, b"404", closes=True)
        text = mesh.client.metrics.render()
        assert sample(text, "tls_handshakes_total", direction="outbound", result="ok") == 1
        denied = sample(mesh.server.metrics.render(), "inbound_http_authz_deny_total")
        assert denied == 9


async def test_no_request_goes_over_a_connection_whose_peer_certificate_expired(pki) -> None:
    """A pooled mesh connection kept busy is never idle long enough to be dropped; without a
    limit it carried requests long after the server's certificate expired. Now the client
    proxy retires it at that NotAfter: the next request verifies the peer again on a new
    connection (here the server proxy has renewed meanwhile, so it succeeds)."""
    web = pki.credentials("web")
    # A server certificate that expires 4 s from now.
    ident, key = Identity("api", "default"), PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    soon = datetime.now(UTC) - timedelta(hours=24) + timedelta(seconds=4)
    short = issue_identity(ident, key, pki.issuer, now=soon, skew=timedelta(0))
    api_short = MeshCredentials(ident.dns_name, short.chain_pem(), key.to_pem(), pki.bundle.pem())
    async with run_app() as app_port, run_mesh(web, api_short, app_port=app_port) as mesh:
        assert short.certificate.not_after > datetime.now(UTC)
        async with aiohttp.ClientSession() as http:

            async def get() -> None:
                async with http.get(
                    f"http://127.0.0.1:{mesh.outbound}/echo", headers={"Host": "api"}
                ) as resp:
                    assert resp.status == 200, await resp.text()

            await get()
            mesh.server.credentials.update(pki.credentials("api"))  # renewed: for new sessions
            deadline = short.certificate.not_after.timestamp() + 1.5
            while time.time() < deadline:  # busy: the pooled connection is never idle 3 s
                await get()
                await asyncio.sleep(0.2)
        text = mesh.client.metrics.render()
    assert sample(text, "tls_handshakes_total", direction="outbound", result="ok") == 2


async def test_pipelined_requests_are_answered_in_order_with_bounded_memory(pki) -> None:
    """Two faults of pipelining clients. 5,000 small requests in one write (170 KB) got a 431
    "request head over 65536 bytes": each read was counted whole against the partial head at
    its end. And a client that pipelines without reading its answers made the proxy parse
    every request and pile every answer into the client's write buffer (1 GB for 57 MB of
    requests, measured). Now at most MAX_PIPELINED requests (plus what one read brings) wait,
    the next answer waits for the client to read, and nothing is lost."""
    app = _RawApp()
    small = b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n"
    async with behind_the_mesh(pki, app) as mesh:
        reply = await raw_exchange(
            mesh.outbound,
            small * 5_000 + b"GET /ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        assert reply.count(b"HTTP/1.1 200 OK\r\n") == 5_001 and b" 431 " not in reply

        big, count = b"GET /big HTTP/1.1\r\nHost: api\r\n\r\n", 3_000  # 16 KiB answers
        before = sample(mesh.client.metrics.render(), "request_total", direction="outbound")
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", mesh.outbound))
        try:
            await loop.sock_sendall(sock, big * count)  # and read nothing for a while
            await asyncio.sleep(1.5)
            port = sock.getsockname()[1]
            (server,) = [
                o for o in gc.get_objects()
                if isinstance(o, Http1Server) and o.link.peer and o.link.peer[1] == port
            ]  # fmt: skip
            assert server.piped and len(server.queue) <= MAX_PIPELINED + count
            assert server.link.transport.get_write_buffer_size() <= 128 * 1024
            served = sample(mesh.client.metrics.render(), "request_total", direction="outbound")
            assert served - before < count // 2  # buffers hold some answers; the proxy waits
            marker, tail, answers = b"HTTP/1.1 200 OK\r\n", b"", 0
            async with asyncio.timeout(30):
                while answers < count:  # now read: every answer arrives
                    data = await loop.sock_recv(sock, 1 << 20)
                    assert data, answers
                    joined = tail + data
                    answers += joined.count(marker)
                    tail = joined[-(len(marker) - 1) :]
        finally:
            sock.close()


async def test_a_pooled_connection_closed_under_a_request_is_retried_if_idempotent(
    pki, caplog
) -> None:
    """An application that closes an idle keep-alive connection just as the proxy reuses it
    (here: it answers one request per connection, then closes at the next without a word).
    A bodiless idempotent request is sent again on a new connection; a POST with a body is
    not (it may have been acted on): 502."""
    caplog.set_level(logging.INFO, logger="proxy.http1")
    seen: list[bytes] = []

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")  # the next request: closed unanswered
            seen.append(head.split(b" ", 2)[1])
        writer.close()

    async with behind_the_mesh(pki, one_per_connection) as mesh, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{mesh.outbound}"
        for n in range(3):
            async with http.get(f"{url}/get-{n}", headers={"Host": "api"}) as resp:
                assert resp.status == 200 and await resp.read() == b"ok"
        async with http.post(f"{url}/post", data=b"body", headers={"Host": "api"}) as resp:
            assert resp.status == 502
    # The first GET opened the connection; each next request met a pooled one that closed.
    assert seen == [b"/get-0", b"/get-1", b"/get-1", b"/get-2", b"/get-2", b"/post"]
    assert "on a pooled connection; sent again on a new one" in caplog.text
