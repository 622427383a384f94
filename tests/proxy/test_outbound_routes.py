"""Outbound route timeouts and retries through two real proxies (mesh TLS) to a real aiohttp
app: the matched rule's response timeout answers 504 before the head, its request timeout cuts
a response still arriving, a request no timed rule matches is not limited; a retried request
is sent again whole (bodies included) on a retried status or a try's timeout, within its
limit, and one over the body limit is not."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import pytest
from proxy_mesh import raw_exchange, run_app, run_mesh, sample, settled, stalled_beside_live

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.errors import ConfigError
from proxy.routes import (
    Endpoint,
    OutboundRule,
    RouteRetry,
    RouteTimeouts,
    Service,
    StaticRoutes,
)

pytestmark = pytest.mark.timeout(60)

SLEEP = (HttpMatch(path=PathMatch("PathPrefix", "/sleep")),)
URGENT = (
    HttpMatch(path=PathMatch("PathPrefix", "/sleep"), headers=(ValueMatch("x-urgent", "1"),)),
)


async def test_route_timeouts_answer_504_or_cut_the_response(pki, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.http1")
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        live = Endpoint("127.0.0.1", app_port, api.identity, mesh.server.port("inbound"))
        rules = (
            OutboundRule("HTTPRoute shop/slow", SLEEP, RouteTimeouts(request=1.0, response=0.3)),
            OutboundRule("HTTPRoute shop/urgent", URGENT, RouteTimeouts(response=0.1)),
            OutboundRule("default", (), RouteTimeouts()),
        )
        mesh.routes.replace((Service("api", (live,), rules=rules),))
        url = f"http://127.0.0.1:{mesh.outbound}"
        host = {"Host": "api"}
        connector = aiohttp.TCPConnector(limit=1)  # one client connection throughout
        async with aiohttp.ClientSession(connector=connector) as http:

            async def get(path: str, **headers: str) -> tuple[int, str, bytes, float]:
                started = time.monotonic()
                async with http.get(url + path, headers={**host, **headers}) as resp:
                    body = await resp.read()
                    error = resp.headers.get("l5d-proxy-error", "")
                    return resp.status, error, body, time.monotonic() - started

            # Within its limits: answered.
            assert (await get("/sleep?before=0.05"))[:3] == (200, "", b"head\ndone\n")
            # No head within the response timeout: 504, and the client connection stays.
            status, error, _, took = await get("/sleep?before=2")
            assert status == 504 and 0.3 <= took < 1.5, (status, took)
            assert error == "no response within the route's response timeout of 0.3s"
            # The more specific rule wins: with the header, 0.1 s.
            status, error, _, took = await get("/sleep?before=2", **{"x-urgent": "1"})
            assert status == 504 and took < 0.3 and "response timeout of 0.1s" in error
            # A request no timed rule matches has no limit (the default rule has none).
            status, _, body, took = await get("/slow?before=0.5")
            assert status == 200 and body == b"head\ndone\n" and took >= 0.5
            # The head in time but the body late: the request timeout (1 s) cuts the response.
            started = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await get("/sleep?after=3")
            assert 0.9 <= time.monotonic() - started < 2.5
            assert "cut mid-response: the route's request timeout (1s) expired" in caplog.text
            # The next request (on a new client connection) is served normally.
            assert (await get("/sleep"))[:3] == (200, "", b"head\ndone\n")
        text = mesh.client.metrics.render()
        assert sample(text, "response_total", direction="outbound", status_code="504") == 2
        assert settled(mesh, "api", live)


async def test_a_timed_out_request_closes_its_upstream_connection(pki) -> None:
    """The upstream connection of a request answered 504 is closed, not pooled: the late
    answer would otherwise be read as the next request's."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        live = Endpoint("127.0.0.1", app_port, api.identity, mesh.server.port("inbound"))
        rules = (OutboundRule("r", SLEEP, RouteTimeouts(response=0.2)),)
        mesh.routes.replace((Service("api", (live,), rules=rules),))
        out = mesh.client.outbound
        assert out is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound)
        try:
            # Pipelined: the second request must get its own answer, after the 504.
            writer.write(
                b"GET /sleep?before=0.6 HTTP/1.1\r\nHost: api\r\n\r\n"
                b"GET /sleep HTTP/1.1\r\nHost: api\r\n\r\n"
            )
            async with asyncio.timeout(10):
                first = await reader.readuntil(b"\r\n\r\n")
                assert first.startswith(b"HTTP/1.1 504 Gateway Timeout"), first
                # Its upstream connection is closed at once, well before the late answer
                # (0.6 s) could arrive on it.
                text = mesh.client.metrics.render()
                assert sample(text, "tcp_close_total", direction="outbound", peer="dst") == 1
                second = await reader.readuntil(b"0\r\n\r\n")
            assert second.startswith(b"HTTP/1.1 200") and b"done" in second, second
        finally:
            writer.close()


def test_a_route_table_file_gives_a_service_timeouts_and_refuses_bad_ones() -> None:
    endpoint = {"host": "127.0.0.1", "port": 8080}
    routes = StaticRoutes.from_dict(
        {"services": [{"name": "api", "endpoints": [endpoint], "timeouts": {"response": 2}},
                      {"name": "db", "endpoints": [endpoint]}]}
    )  # fmt: skip
    api, db = routes.by_name("api"), routes.by_name("db")
    assert api is not None and db is not None and db.rules == ()
    assert api.rule_for("POST", "/any", {}, {}) == OutboundRule(
        "config", (), RouteTimeouts(None, 2)
    )
    for timeouts, message in (
        ({"request": 0}, "the request timeout must be a positive number of seconds"),
        ({"response": "2s"}, "the response timeout must be a positive number of seconds"),
        ({"idle": 5}, "unknown timeouts ['idle'] (request and response are known)"),
        ([5], "timeouts must be a mapping with request and/or response (seconds), got [5]"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            StaticRoutes.from_dict(
                {"services": [{"name": "api", "endpoints": [endpoint], "timeouts": timeouts}]}
            )


FLAKY = (HttpMatch(path=PathMatch("Exact", "/flaky")),)


async def test_retries_send_the_whole_request_again_within_the_limit(pki, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.http1")
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
        live = Endpoint("127.0.0.1", app_port, api.identity, mesh.server.port("inbound"))
        retry = RouteRetry(max_retries=2, timeout=0.3, min_backoff=0.01, max_request_bytes=4096)
        rules = (OutboundRule("HTTPRoute shop/flaky", FLAKY, retry=retry),)
        mesh.routes.replace((Service("api", (live,), rules=rules),))
        url = f"http://127.0.0.1:{mesh.outbound}"
        async with aiohttp.ClientSession() as http:

            async def call(query: str, data: object = None) -> tuple[int, bytes, str]:
                async with http.post(
                    f"{url}/flaky?{query}", data=data, headers={"Host": "api"}
                ) as resp:
                    return resp.status, await resp.read(), resp.headers.get("x-count", "")

            async def tries(key: str) -> int:
                async with http.get(f"{url}/count?key={key}", headers={"Host": "api"}) as resp:
                    return int(await resp.text())

            # One 503, then the answer: the client sees only the answer, body intact.
            body = bytes(range(256)) * 8  # 2 KiB, under the 4 KiB limit
            assert await call("key=a&fail=1", body) == (200, body, "2")
            # The same with a chunked body (as framed on the wire, last chunk included).

            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(4):
                    yield b"x" * 500

            assert await call("key=b&fail=1", chunks()) == (200, b"x" * 2000, "2")
            # More failures than retries: the last answer is the client's.
            assert (await call("key=c&fail=5", b"q"))[0] == 503
            assert await tries("c") == 3  # one try and two retries
            # A status the route does not retry goes to the client at once.
            assert (await call("key=d&fail=1&status=404", b"q"))[0] == 404
            assert await tries("d") == 1
            # A body over the limit is not kept, so its request is not sent again.
            assert (await call("key=e&fail=1", b"z" * 5000))[0] == 503
            assert await tries("e") == 1
            # A try that outlives the per-try timeout (0.3 s) is given up and sent again.
            started = time.monotonic()
            status, _, count = await call("key=f&fail=1&sleep=3", b"q")
            assert (status, count) == (200, "2") and time.monotonic() - started < 1.5
        assert "answered 503; retry 1 of 2 in" in caplog.text
        assert "no response within the per-try timeout of 0.3s; retry 1 of 2" in caplog.text
        text = mesh.client.metrics.render()
        assert sample(text, "retry_total", authority="api", reason="status") == 1 + 1 + 2
        assert sample(text, "retry_total", authority="api", reason="timeout") == 1
        # Each try counts where it went: the retried answers too.
        assert sample(text, "response_total", direction="outbound", status_code="503") == 6
        assert settled(mesh, "api", live)


async def test_a_retried_request_goes_to_another_endpoint_when_one_fails(pki) -> None:
    """The retry is a new endpoint choice: beside an endpoint answering 503 to everything,
    every request succeeds."""

    async def unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                     b"connection: close\r\n\r\n")  # fmt: skip
        await writer.drain()
        writer.close()

    web, api = pki.credentials("web"), pki.credentials("api")
    bad_app = await asyncio.start_server(unavailable, "127.0.0.1", 0)
    try:
        async with run_app() as app_port, run_mesh(web, api, app_port=app_port) as mesh:
            inbound = mesh.server.port("inbound")
            good = Endpoint("127.0.0.1", app_port, api.identity, inbound)
            bad = Endpoint("127.0.0.1", bad_app.sockets[0].getsockname()[1], api.identity, inbound)
            retry = RouteRetry(max_retries=3, min_backoff=0.001, max_backoff=0.002)
            rules = (OutboundRule("r", FLAKY, retry=retry),)
            mesh.routes.replace((Service("api", (bad, good), rules=rules),))
            async with aiohttp.ClientSession() as http:
                for n in range(30):
                    async with http.get(
                        f"http://127.0.0.1:{mesh.outbound}/flaky?key=k{n}",
                        headers={"Host": "api"},
                    ) as resp:
                        assert resp.status == 200
            text = mesh.client.metrics.render()
            assert sample(text, "retry_total", reason="status") >= 1
            assert sample(text, "response_total", direction="outbound", status_code="200") == 30
    finally:
        bad_app.close()


async def test_a_try_given_up_while_connecting_leaves_no_trace_when_its_connect_ends(pki) -> None:
    """The first try connects to a peer that stalls its handshake; the per-try timeout sends
    the request again, to a live endpoint. When the stalled connect fails later, it neither
    fails over (a pick no request would ever complete) nor takes the pick back twice."""
    async with stalled_beside_live(pki, connect_timeout=0.8) as s:
        mesh, out, live, stalled = s.mesh, s.outbound, s.live, s.stalled
        retry = RouteRetry(max_retries=1, timeout=0.2, min_backoff=0.001, max_backoff=0.002)
        svc = Service("api", (stalled, live), rules=(OutboundRule("r", FLAKY, retry=retry),))
        mesh.routes.replace((svc,))
        balancer = out.balancer(svc, out.clock())
        balancer.state(live).pending = 1000  # the first try goes to the stalled peer
        request = b"GET /flaky?key=z HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        exchange = asyncio.create_task(raw_exchange(mesh.outbound, request))
        await asyncio.sleep(0.1)
        balancer.state(live).pending = 0
        balancer.state(live).rtt = 0.001  # the retry goes to the live endpoint
        reply = await exchange
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        await asyncio.sleep(1.0)  # the stalled connect has timed out by now
        assert settled(mesh, "api", live, stalled)
        text = mesh.client.metrics.render()
        assert sample(text, "request_total", direction="outbound", authority="api") == 2
        assert sample(text, "retry_total", reason="timeout") == 1


async def test_a_request_given_up_by_the_client_proxy_is_cut_at_the_application(pki) -> None:
    """After a route timeout the client proxy closes the mesh connection; the server proxy
    then closes its connection to the application at once, so that the application stops
    working on a request nobody waits for (before, it stayed open until the answer)."""
    saw_eof: list[float] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # to EOF: the proxy closed the connection
        saw_eof.append(time.monotonic())
        writer.close()

    web, api = pki.credentials("web"), pki.credentials("api")
    app = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    try:
        port = app.sockets[0].getsockname()[1]
        async with run_mesh(web, api, app_port=port) as mesh:
            live = Endpoint("127.0.0.1", port, api.identity, mesh.server.port("inbound"))
            rules = (OutboundRule("r", (), RouteTimeouts(response=0.3)),)
            mesh.routes.replace((Service("api", (live,), rules=rules),))
            started = time.monotonic()
            reply = await raw_exchange(
                mesh.outbound, b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1.1 504"), reply[:200]
            for _ in range(100):
                if saw_eof:
                    break
                await asyncio.sleep(0.01)
            assert saw_eof and saw_eof[0] - started < 1.0
    finally:
        app.close()
