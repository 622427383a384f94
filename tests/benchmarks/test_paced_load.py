"""The fixed-rate load generators of benchmarks/proxy_http1.py (``paced_load.c`` and its Python
fallback) against a real local HTTP server: the README's latency figures come from them, so
they must send the scheduled number of requests, count non-2xx answers, measure latency from
the scheduled time (queueing included) and fail loudly when the server misbehaves."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "proxy_http1.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_proxy_http1", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


class Backend(socketserver.ThreadingTCPServer):
    """Keep-alive HTTP/1.1 server with one fixed response; optional per-request delay, or
    closing the connection instead of answering."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, status: str = "200 OK", delay: float = 0.0, close: bool = False) -> None:
        self.response = f"HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok".encode()
        self.delay, self.close, self.served = delay, close, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(socketserver.BaseRequestHandler):
    server: Backend

    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                buf += chunk
            _, _, buf = buf.partition(b"\r\n\r\n")
            if self.server.close:
                return
            if self.server.delay:
                time.sleep(self.server.delay)
            with self.server.lock:  # counted before the answer leaves, so never read short
                self.server.served += 1
            sock.sendall(self.server.response)


@contextlib.contextmanager
def _serve(backend: Backend) -> Iterator[Backend]:
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = bench.build_generator(tmp_path_factory.mktemp("paced"))
    assert exe is not None, "paced_load.c did not compile (make test installs gcc)"
    return Path(exe)


@pytest.fixture(params=["c", "python"])
def generator(request: pytest.FixtureRequest, compiled: Path) -> list[str]:
    """The command prefix of one generator; arguments PORT RATE DURATION CONNS follow."""
    if request.param == "c":
        return [str(compiled)]
    return [sys.executable, str(BENCH), "--paced"]


def _run(
    generator: list[str], port: int, rate: float, duration: float, conns: int
) -> subprocess.CompletedProcess[str]:
    args = [*generator, str(port), str(rate), str(duration), str(conns)]
    if "--paced" not in generator:
        args.append(bench.REQUEST.decode())
    return subprocess.run(args, capture_output=True, text=True, timeout=duration + 40)


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, float]:
    assert done.returncode == 0, done.stderr
    out: dict[str, float] = json.loads(done.stdout)
    assert set(out) == {"rps", "total", "p50", "p99", "errors"}
    return out


def test_sends_the_scheduled_requests_and_measures_them(generator: list[str]) -> None:
    with _serve(Backend()) as backend:
        r = _result(_run(generator, backend.port, 400, 1.0, 4))
        assert 398 <= r["total"] <= 402  # one request per 2.5 ms slot for 1 s
        assert backend.served == r["total"] + 4  # plus one warm-up request per connection
        assert r["errors"] == 0
        assert 0 < r["p50"] <= r["p99"] < 1000  # milliseconds


def test_counts_answers_that_are_not_2xx(generator: list[str]) -> None:
    with _serve(Backend("503 Service Unavailable")) as backend:
        r = _result(_run(generator, backend.port, 200, 0.5, 2))
        assert r["total"] >= 99
        assert r["errors"] == r["total"]


def test_latency_counts_from_the_scheduled_time(generator: list[str]) -> None:
    # 2 connections x 20 ms per answer = 100 answers/s, against 200 scheduled per second: the
    # backlog grows for the whole second: the median request waits ~0.5 s beyond its slot and
    # the last ones ~1 s. A closed-loop generator would report ~20 ms (coordinated omission).
    with _serve(Backend(delay=0.02)) as backend:
        r = _result(_run(generator, backend.port, 200, 1.0, 2))
        assert 198 <= r["total"] <= 202
        assert 300 < r["p50"] < 900
        assert 800 < r["p99"] < 2000


def test_a_server_that_closes_the_connection_is_a_failure(generator: list[str]) -> None:
    with _serve(Backend(close=True)) as backend:
        done = _run(generator, backend.port, 100, 0.5, 2)
        assert done.returncode != 0
        assert "the server closed a benchmark connection" in done.stderr
        assert done.stdout == ""
