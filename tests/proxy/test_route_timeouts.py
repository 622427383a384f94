"""Outbound route timeouts through two real proxies (mesh TLS) to a real aiohttp app: the
matched rule's response timeout answers 504 before the head, its request timeout cuts a
response still arriving, and a request no timed rule matches is not limited."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import pytest
from proxy_mesh import run_app, run_mesh, sample

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.errors import ConfigError
from proxy.routes import Endpoint, OutboundRule, RouteTimeouts, Service, StaticRoutes

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
        # A timed-out try counts its time in the endpoint's latency estimate.
        balancer = mesh.client.outbound.balancer(  # type: ignore[union-attr]
            mesh.routes.by_name("api"),
            0.0,  # type: ignore[arg-type]
        )
        assert balancer.state(live).pending == 0


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
