"""The data plane under load and misbehaviour, through real ``trustmesh proxy run`` processes
(uvloop, identity and destination ``--tls``, a mesh file): 64 MiB bodies each way, a client
that stops reading, an app that stops reading, and a client that leaves mid-response. The
proxies' resident memory is read with psutil while it happens.

client -> client proxy (outbound, Host routing) -> mesh TLS -> server proxy -> raw app
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from mesh_testkit import HOST, MeshKit, ProxyPorts, service_doc, workload_doc

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

NS = "audit"
API = f"api.{NS}.svc.cluster.local:8080"
MIB = 1 << 20
BIG = 64 * MIB
# What a proxy may grow by while 64 MiB stream through it or wait behind a stalled peer:
# socket and TLS buffers, not the body.
MAX_GROWTH = 24 * MIB
HEAD_TIMEOUT_FLAGS = ("--head-timeout", "1")


class _App:
    """A raw HTTP/1.1 app on its own event loop thread.

    ``GET /big`` streams 64 MiB (Content-Length); ``POST /count`` reads the body and answers
    its length; ``POST /stall`` never reads the body; anything else answers ``ok``.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.stalled = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _App:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, HOST, self.port), self.loop
        ).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1]
                if path == b"/big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                    block = bytes(MIB)
                    for _ in range(BIG // MIB):
                        writer.write(block)
                        await writer.drain()
                elif path == b"/count":
                    length = int(_header(head, b"content-length"))
                    got = 0
                    while got < length:
                        got += len(await reader.read(MIB))
                    body = b"%d" % got
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip
                elif path == b"/stall":
                    self.stalled.set()
                    await asyncio.sleep(60)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name!r} in {head!r}")


class Audit:
    def __init__(self, kit: MeshKit, client: ProxyPorts) -> None:
        self.kit, self.client = kit, client
        self.procs = {
            c.spec.name: psutil.Process(c.proc.pid)
            for c in kit.supervisor.children
            if c.spec.name.startswith("proxy-")
        }

    def rss(self) -> dict[str, int]:
        return {name: p.memory_info().rss for name, p in self.procs.items()}

    def growth(self, before: dict[str, int]) -> dict[str, int]:
        return {name: rss - before[name] for name, rss in self.rss().items()}

    def connect(self) -> socket.socket:
        return socket.create_connection((HOST, self.client.outbound), timeout=10)


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    root = tmp_path_factory.mktemp("audit")
    kit = MeshKit(root / "home")
    try:
        (app_port,) = kit.ports(1)
        client, server = kit.proxy_ports(), kit.proxy_ports()

        docs = [
            workload_doc("client-0", NS, "client", client.inbound, {}),
            workload_doc("api-0", NS, "api", server.inbound, {"http": app_port}),
            service_doc("api", NS, "api", 8080, "http"),
        ]
        mesh_file = root / "mesh.yaml"
        mesh_file.write_text(yaml.safe_dump_all(docs))
        with _App(app_port):
            with kit.together():
                kit.start_identity()
                kit.start_destination(Path(mesh_file))
            with kit.together():
                # The head timeout comes from the command line (its default is 30 s).
                kit.start_proxy("client-0", NS, "client", client, extra=HEAD_TIMEOUT_FLAGS)
                kit.start_proxy("api-0", NS, "api", server, (app_port,))
            audit = Audit(kit, client)
            _wait_routable(audit)
            yield audit
    finally:
        kit.close()


def _wait_routable(audit: Audit) -> None:
    deadline = time.monotonic() + 30
    while True:
        with audit.connect() as s:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % API.encode())
            reply = _read_all(s)
        if reply.startswith(b"HTTP/1.1 200"):
            return
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)


def _read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(MIB):
        out += chunk
    return bytes(out)


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def test_64_mib_each_way_keeps_the_proxies_small(audit: Audit) -> None:
    before = audit.rss()
    with audit.connect() as s:
        s.sendall(b"POST /count HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n" % (API.encode(), BIG))  # fmt: skip
        block = bytes(MIB)
        for _ in range(BIG // MIB):
            s.sendall(block)
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"%d" % BIG), (head, rest)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % API.encode())
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert len(rest) + len(_read_all(s)) == BIG
    grown = audit.growth(before)
    assert max(grown.values()) < MAX_GROWTH, grown


def test_a_client_that_stops_reading_pauses_the_proxies(audit: Audit) -> None:
    """64 MiB on their way to a client that reads nothing: the proxies stop reading the app
    instead of buffering the body; then the client reads it all."""
    before = audit.rss()
    with audit.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % API.encode())
        time.sleep(1.0)  # an unpaused proxy would take in the whole body meanwhile
        grown = audit.growth(before)
        _, rest = _read_head(s)
        assert len(rest) + len(_read_all(s)) == BIG
    assert max(grown.values()) < MAX_GROWTH, grown


def test_an_app_that_stops_reading_pauses_the_client(audit: Audit) -> None:
    """The app reads none of a 64 MiB upload: the proxies stop reading the client, whose
    sends block, and the proxies stay small."""
    before = audit.rss()
    with audit.connect() as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n" % (API.encode(), BIG))  # fmt: skip
        s.settimeout(1.0)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < BIG:
                sent += s.send(bytes(MIB))
        grown = audit.growth(before)
    # Kernel socket buffers on the three hops take some (~20 MiB here); a proxy that kept
    # reading would take it all within the second.
    assert sent < BIG, "the whole upload was taken from the client"
    assert max(grown.values()) < MAX_GROWTH, grown


def test_a_client_leaving_mid_response_spoils_no_pooled_connection(audit: Audit) -> None:
    """A client that closes after 1 MiB of a 64 MiB answer, or halfway through sending a body:
    the requests after it are answered whole (no half-read upstream link went back to a
    pool)."""
    for request in (
        b"GET /big HTTP/1.1\r\nHost: %b\r\n\r\n" % API.encode(),
        b"POST /count HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n%b"
        % (API.encode(), 4 * MIB, bytes(MIB)),
    ):
        with audit.connect() as s:
            s.sendall(request)
            if request.startswith(b"GET"):
                _read_head(s)
                s.recv(MIB)
        for _ in range(3):
            with audit.connect() as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % API.encode())  # fmt: skip
                reply = _read_all(s)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok"), reply


def test_the_head_timeout_flag_reaches_the_proxy(audit: Audit) -> None:
    """``trustmesh proxy run --head-timeout 1``: a client that starts a request head and stalls
    gets 408 after about a second, not after the 30 s default."""
    with audit.connect() as s:
        start = time.monotonic()
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: %b\r\nX-Slow: " % API.encode())
        reply = _read_all(s)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"l5d-proxy-error" in reply.lower()
    assert 0.8 <= elapsed < 10, elapsed
