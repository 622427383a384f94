"""ProxyMetrics: in-place counters (Count, HttpSeries) render exactly as dict increments do."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket

import proxy.admin as admin_module
from proxy.admin import AdminServer
from proxy.metrics import ProxyMetrics


def _events(rng: random.Random) -> list[tuple[tuple[str, ...], int, float]]:
    """Requests as (request_total labels, status, latency ms); status 0: no response."""
    authorities = ("api", "api:80", "web.ns.svc", 'we"ird\\name')
    events = []
    for _ in range(500):
        labels = (
            rng.choice(("inbound", "outbound")),
            rng.choice(authorities),
            rng.choice(("true", "no_identity", "")),
            rng.choice(("", "web.ns.serviceaccount.identity.trustmesh.cluster.local")),
            rng.choice(("", "api.ns.serviceaccount.identity.trustmesh.cluster.local")),
        )
        status = rng.choice((0, 200, 200, 204, 403, 404, 502, 503))
        events.append((labels, status, rng.choice((0.2, 1.0, 4.5, 37.0, 999.9, 60000.0))))
    return events


def test_series_and_counts_render_like_dict_increments() -> None:
    events = _events(random.Random(7))
    by_dict, in_place = ProxyMetrics(), ProxyMetrics()
    for labels, status, ms in events:
        by_dict.request_total.inc(labels)
        series = in_place.http_series(labels)
        series.requests.n += 1
        if status:
            code = str(status)
            kind = "failure" if status >= 500 else "success"
            by_dict.response_total.inc((*labels, code, kind))
            by_dict.response_latency_ms.observe((labels[0], labels[1], code), ms)
            series.respond(status, ms)
        allow = ("8080", "default:all-unauthenticated", labels[2], labels[3], "", "any")
        by_dict.inbound_http_authz_allow_total.inc(allow)
        in_place.inbound_http_authz_allow_total.count(allow).n += 1
    text = by_dict.render()
    assert text == in_place.render()
    assert (
        'response_latency_ms_bucket{direction="inbound",authority="api",status_code="200",le="5.0"}'
        in text
    )
    # Both ways of counting add up in one family.
    in_place.request_total.inc(events[0][0])
    assert in_place.request_total.get(events[0][0]) == by_dict.request_total.get(events[0][0]) + 1
    assert in_place.render().count("\nrequest_total{") == text.count("\nrequest_total{")


def test_unused_counters_are_not_shown() -> None:
    m = ProxyMetrics()
    m.http_series(("inbound", "api", "true", "", ""))
    m.inbound_http_authz_allow_total.count(("8080", "srv", "true", "", "", "authz"))
    text = m.render()
    assert "request_total{" not in text and "inbound_http_authz_allow_total{" not in text


async def test_an_admin_client_that_never_reads_does_not_hold_its_handler(monkeypatch) -> None:
    """The answer was written and drained without a limit: a client that asked for a
    /metrics larger than the socket buffers and never read it held the handler, and the
    answer, for ever. Now the connection is reset after WRITE_TIMEOUT."""
    monkeypatch.setattr(admin_module, "WRITE_TIMEOUT", 0.5)
    certificate = b"c" * (64 * 1024 * 1024)  # bigger than any socket buffer on the way
    admin = AdminServer(ProxyMetrics(), ready=lambda: True, certificate=lambda: certificate)
    server = await admin.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /certificate HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(2)  # read nothing meanwhile
        got = 0
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while data := await loop.sock_recv(sock, 1 << 20):
                    got += len(data)
        # the kernel's buffers, then the end: the rest was dropped with the connection
        assert 0 < got < len(certificate) // 2, got
    finally:
        sock.close()
        server.close()
        await server.wait_closed()
