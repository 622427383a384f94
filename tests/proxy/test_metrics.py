"""ProxyMetrics: in-place counters (Count, HttpSeries) render exactly as dict increments do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import shutil
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy.admin as admin_module
from proxy.admin import AdminServer
from proxy.metrics import ProxyMetrics, process_lines

PROMTOOL = shutil.which("promtool")


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
    text = _without_process(by_dict.render())
    assert text == _without_process(in_place.render())
    assert (
        'response_latency_ms_bucket{direction="inbound",authority="api",status_code="200",le="5.0"}'
        in text
    )
    # Both ways of counting add up in one family.
    in_place.request_total.inc(events[0][0])
    assert in_place.request_total.get(events[0][0]) == by_dict.request_total.get(events[0][0]) + 1
    assert in_place.render().count("\nrequest_total{") == text.count("\nrequest_total{")


def _without_process(text: str) -> str:
    """The exposition without the process families, which change between two scrapes."""
    return "\n".join(line for line in text.split("\n") if "process_" not in line)


def _process_values() -> dict[str, float]:
    families = text_string_to_metric_families("\n".join(process_lines()) + "\n")
    return {s.name: s.value for f in families for s in f.samples}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_process_families_say_what_proc_says() -> None:
    """Memory, CPU, descriptors and threads, the families on-call graphs a leak or an fd
    exhaustion with (Linkerd's proxy exports them too), read from /proc at each scrape."""
    before = _process_values()
    with open(os.devnull):  # one more descriptor
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)  # one more thread
        thread.start()
        try:
            deadline = time.process_time() + 0.3
            while time.process_time() < deadline:  # CPU to account for
                pass
            rss_kib = _status("VmRSS")
            now = _process_values()
            threads = _status("Threads")
        finally:
            stop.set()
            thread.join()
    assert now["process_open_fds"] == before["process_open_fds"] + 1
    assert now["process_threads"] == threads
    assert now["process_cpu_seconds_total"] >= before["process_cpu_seconds_total"] + 0.25
    assert abs(now["process_resident_memory_bytes"] - rss_kib * 1024) < 4 * 2**20
    assert now["process_virtual_memory_bytes"] >= now["process_resident_memory_bytes"]
    assert now["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    started = now["process_start_time_seconds"]
    assert time.time() - 86400 < started <= time.time()
    assert started == before["process_start_time_seconds"]
    assert "process_resident_memory_bytes" in ProxyMetrics().render()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is missing")
def test_process_families_pass_promtool() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input="\n".join(process_lines()) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
