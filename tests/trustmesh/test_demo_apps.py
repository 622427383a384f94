"""The demo's apps: served for real on 127.0.0.1, with a burst of connections at once."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from trustmesh.demo.apps import make_server

BURST = 64


@contextlib.contextmanager
def connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            # Not accepted yet: the kernel completes the handshake only while the listen
            # backlog has room, and drops the SYN otherwise (resent after 1 s).
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        yield socks
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def listening(argv: list[str]) -> Iterator[tuple[int, Callable[[], None]]]:
    """The app's server bound and listening; yields its port and what starts serving."""
    server = make_server(argv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        yield server.server_address[1], thread.start
    finally:
        if thread.is_alive():
            server.shutdown()
            thread.join(10)
        server.server_close()


def _recv_http(sock: socket.socket) -> tuple[bytes, dict[str, object]]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(v for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n"))
                      if k.lower() == b"content-length"))  # fmt: skip
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n", 1)[0], json.loads(body)


@pytest.mark.timeout(30)
def test_http_app_takes_a_burst_of_connections_before_accepting_any() -> None:
    app = ["http", "--name", "quote", "--listen", "127.0.0.1:0"]
    with listening(app) as (port, serve), connections(port, BURST) as socks:
        serve()
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: quote\r\nl5d-client-id: api.demo\r\n\r\n")
        for s in socks:
            status, body = _recv_http(s)
            assert status == b"HTTP/1.1 200 OK"
            assert body == {"service": "quote", "client": "api.demo"}


@pytest.mark.timeout(30)
def test_tcp_echo_takes_a_burst_of_connections_before_accepting_any() -> None:
    app = ["tcp-echo", "--listen", "127.0.0.1:0"]
    with listening(app) as (port, serve), connections(port, BURST) as socks:
        serve()
        for i, s in enumerate(socks):
            s.sendall(b"ping %d" % i)
            s.shutdown(socket.SHUT_WR)
        for i, s in enumerate(socks):
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            assert got == b"ping %d" % i
