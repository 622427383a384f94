"""Helpers for the alerts tests: real certificates built with pki at a fixed time, a real TLS
server (pyOpenSSL) on 127.0.0.1 for probes, and a silent TCP listener."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pki_testkit import serve_tls

from pki.certs import Certificate, Credential, create_anchor, create_issuer, issue_leaf
from pki.keys import PrivateKey

NOW = datetime(2030, 1, 1, tzinfo=UTC)
WORKLOAD_NAME = "web.default.serviceaccount.identity.trustmesh.cluster.local"
WEBHOOK_NAME = "trustmesh-proxy-injector.trustmesh.svc"


@dataclass(frozen=True)
class Chain:
    anchor: Credential
    issuer: Credential
    workload: Credential
    webhook: Credential
    other: Credential


def leaf(issuer: Credential, name: str, lifetime: timedelta = timedelta(hours=24)) -> Credential:
    key = PrivateKey.generate()
    cert = issue_leaf(key.public_key(), name, issuer, now=NOW, lifetime=lifetime)
    return Credential(cert, key, issuer.full_chain)


def ts(cert: Certificate, attr: str = "not_after") -> float:
    return float(getattr(cert, attr).timestamp())


def make_chain() -> Chain:
    anchor_key = PrivateKey.generate()
    anchor = Credential(
        create_anchor(anchor_key, now=NOW, lifetime=timedelta(days=365)), anchor_key
    )
    issuer = create_issuer(PrivateKey.generate(), anchor, now=NOW, lifetime=timedelta(hours=48))
    return Chain(
        anchor=anchor,
        issuer=issuer,
        workload=leaf(issuer, WORKLOAD_NAME),
        webhook=leaf(issuer, WEBHOOK_NAME, timedelta(hours=40)),
        other=leaf(issuer, "db.example.org", timedelta(hours=40)),
    )


@contextlib.contextmanager
def tls_server(credential: Credential) -> Iterator[str]:
    """Serve TLS handshakes presenting ``credential`` (leaf + chain); yields HOST:PORT."""
    with serve_tls(credential) as server:
        yield f"127.0.0.1:{server.port}"


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel backlog does) and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def assert_silent_connections_closed(port: int, count: int = 20, within: float = 5.0) -> None:
    """Open ``count`` connections to 127.0.0.1:``port`` that send nothing: the server must
    close each one by itself, before our own ``within`` seconds run out."""
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        for sock in silent:
            sock.settimeout(within)
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()


async def unread_answer_bytes(port: int, request: bytes, hold: float = 2.0) -> int:
    """Send ``request`` to 127.0.0.1:``port`` with a tiny receive buffer, read nothing for
    ``hold`` seconds, then read to the end (or a reset): the bytes that came. A server that
    drops a client who does not read sends the kernel's buffers' worth, not the whole answer."""
    import asyncio

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    got = 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        await asyncio.sleep(hold)
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while data := await loop.sock_recv(sock, 1 << 20):
                    got += len(data)
    finally:
        sock.close()
    return got


async def assert_admin_drops_an_unread_answer(
    admin_cls: Any, module: Any, monkeypatch: Any
) -> None:
    """The identity or destination ``AdminServer`` (``admin_cls``, from ``module``): a client
    that asks for a /metrics bigger than the socket buffers and never reads loses the
    connection after WRITE_TIMEOUT (made 0.5 s), instead of holding the handler for ever."""
    from prometheus_client import CollectorRegistry, Info

    big = 16 * 1024 * 1024
    monkeypatch.setattr(module, "WRITE_TIMEOUT", 0.5)
    registry = CollectorRegistry()
    Info("big", "a large exposition", registry=registry).info({"v": "x" * big})
    admin = admin_cls(registry, lambda: (True, "ready"))
    port = await admin.start("127.0.0.1", 0)
    try:
        got = await unread_answer_bytes(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert 0 < got < big // 2, got  # the buffers' worth, then the connection went
        assert await unread_answer_bytes(port, b"GET /live HTTP/1.1\r\n\r\n", hold=0) > 0
    finally:
        await admin.stop()


class Receiver:
    """A real HTTP server on 127.0.0.1 that records JSON POST bodies (a webhook receiver)."""

    def __init__(self, status: int = 200) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: list[tuple[str, object]] = []
        arrived = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with arrived:
                    received.append((self.path, json.loads(body)))
                    arrived.notify_all()
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"refused" if status >= 300 else b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.received = received
        self.arrived = arrived
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def http_server(respond: Callable[[str], tuple[int, bytes]]) -> Iterator[str]:
    """A real HTTP server on loopback answering ``GET path`` with ``respond(path)``; yields
    HOST:PORT and stops the server on exit."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = respond(self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
