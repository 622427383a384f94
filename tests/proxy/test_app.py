"""The runnable proxy end to end, as real processes: curl -> outbound proxy -> mesh TLS ->
inbound proxy -> a stdlib HTTP app, with tshark watching the mesh hop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
SECRET = "very-secret-payload-4f1c"

APP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("client=" + self.headers.get("l5d-client-id", "-") + " SECRET_MARK\\n").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
""".replace("SECRET_MARK", SECRET)


def _start(args: list[str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the test timeout
    if not line:
        raise AssertionError(f"process exited: {proc.stderr.read() if proc.stderr else ''}")
    return line


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            _stop(proc)


def _write_identity(pki, tmp: Path, name: str) -> tuple[str, dict[str, str]]:
    creds = pki.credentials(name)
    (tmp / f"{name}.crt").write_bytes(creds.chain_pem)
    key = tmp / f"{name}.key"
    key.write_bytes(creds.key_pem)
    key.chmod(0o600)
    (tmp / "bundle.pem").write_bytes(creds.bundle_pem)
    return creds.identity, {"chain": f"{name}.crt", "key": f"{name}.key", "bundle": "bundle.pem"}


def _app_behind_proxy(
    app_source: str, pki, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> tuple[int, str, subprocess.Popen[str], int]:
    """The app (Python source printing its port) and an inbound proxy process (identity api)
    in front of it: the app's port, api's identity, the proxy process and its inbound port."""
    app = _start([sys.executable, "-c", app_source])
    procs.append(app)
    app_port = int(_first_line(app))
    api_id, api_files = _write_identity(pki, tmp_path, "api")
    zero = {"host": "127.0.0.1", "port": 0}
    api_cfg = tmp_path / "api.yaml"
    api_cfg.write_text(yaml.safe_dump({
        "identity": api_id, "credentials": api_files, "outbound": zero, "admin": zero,
        "inbound": {**zero, "ports": [app_port]},
    }))  # fmt: skip
    server = _start([sys.executable, "-m", "proxy", "--config", str(api_cfg)])
    procs.append(server)
    return app_port, api_id, server, json.loads(_first_line(server))["inbound"]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("tshark")), reason="curl+tshark")
def test_curl_through_two_proxy_processes_with_hybrid_mesh_tls(pki, tmp_path, procs) -> None:
    app_port, api_id, _, inbound = _app_behind_proxy(APP, pki, tmp_path, procs)
    web_id, web_files = _write_identity(pki, tmp_path, "web")
    zero = {"host": "127.0.0.1", "port": 0}

    web_cfg = tmp_path / "web.yaml"
    web_cfg.write_text(yaml.safe_dump({
        "identity": web_id, "credentials": web_files, "outbound": zero, "admin": zero,
        "inbound": zero,
        "routes": {"services": [{"name": "api", "endpoints": [
            {"host": "127.0.0.1", "port": app_port, "identity": api_id, "proxy_port": inbound}]}]},
    }))  # fmt: skip
    client = _start([sys.executable, "-m", "proxy", "--config", str(web_cfg)])
    procs.append(client)
    ports = json.loads(_first_line(client))

    pcap = tmp_path / "hop.pcap"
    tshark = _start(["tshark", "-i", "lo", "-f", f"tcp port {inbound}", "-w", str(pcap)])
    procs.append(tshark)
    assert tshark.stderr is not None
    deadline = time.monotonic() + 30
    while "Capturing on" not in tshark.stderr.readline():
        assert time.monotonic() < deadline and tshark.poll() is None, "tshark did not start"
    # "Capturing on" can precede the filter being live: probe until a probe shows up on disk.
    empty = pcap.stat().st_size if pcap.exists() else 0
    while not pcap.exists() or pcap.stat().st_size <= empty:
        assert time.monotonic() < deadline, "tshark captured nothing"
        socket.create_connection(("127.0.0.1", inbound), timeout=2).close()
        time.sleep(0.2)

    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-H", "Host: api",
         f"http://127.0.0.1:{ports['outbound']}/hello", f"http://127.0.0.1:{ports['outbound']}/again"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"client={web_id} {SECRET}\n" * 2

    metrics = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{ports['admin']}/metrics"],
        capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    assert (
        'tls_handshakes_total{direction="outbound",group="X25519MLKEM768",result="ok"} 1' in metrics
    )

    time.sleep(0.5)  # let the capture flush the last packets before stopping it
    tshark.send_signal(signal.SIGINT)
    tshark.wait(timeout=20)
    groups = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={inbound},tls",
         "-Y", "tls.handshake.type == 1", "-T", "fields",
         "-e", "tls.handshake.extensions_key_share_group"],
        capture_output=True, text=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert groups and all(g.split(",")[0] in ("4588", "0x11ec") for g in groups), groups
    raw = pcap.read_bytes()
    assert SECRET.encode() not in raw and b"/hello" not in raw and web_id.encode() not in raw
    assert os.stat(tmp_path / "web.key").st_mode & 0o777 == 0o600


def test_timeouts_come_from_the_config_and_are_checked(tmp_path) -> None:
    from proxy.app import ProxySettings, proxy_from_config
    from proxy.errors import ConfigError

    config = {
        "identity": "web.default.serviceaccount.identity.trustmesh.cluster.local",
        "credentials": {"chain": "c.pem", "key": "k.pem", "bundle": "b.pem"},
        "head_timeout": 5,
    }
    proxy = proxy_from_config(config, tmp_path, time.monotonic)
    assert proxy.settings.head_timeout == 5.0 and proxy.settings.detect_timeout == 10.0
    for bad in (0, -1.0, "5", True):
        with pytest.raises(ConfigError, match="head_timeout must be a positive number"):
            ProxySettings(head_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head_timeout"):
        proxy_from_config({**config, "head_timeout": "soon"}, tmp_path, time.monotonic)


def test_file_credentials_keep_the_last_good_set(pki, tmp_path) -> None:
    """Files that cannot be used (a file truncated mid-write, an encrypted key) never replace
    the set in use; they are not re-read until they change, and a fixed file is picked up."""
    from proxy.app import FileCredentials

    now = [0.0]
    identity, files = _write_identity(pki, tmp_path, "web")
    chain, key, bundle = (tmp_path / files[k] for k in ("chain", "key", "bundle"))
    source = FileCredentials(identity, chain, key, bundle, clock=lambda: now[0], interval=1.0)
    good = source.current()
    assert good is not None and good.chain_pem == chain.read_bytes()

    def change(path: Path, data: bytes) -> None:
        path.write_bytes(data)
        stamp = path.stat().st_mtime_ns + 1_000_000  # a distinct mtime, however coarse the clock
        os.utime(path, ns=(stamp, stamp))
        now[0] += 1.0

    change(chain, b"")  # truncated by its writer, not yet rewritten
    assert source.current() is good
    change(chain, good.chain_pem)
    change(key, b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n...")
    assert source.current() is good
    now[0] += 1.0
    assert source.current() is good  # unchanged files are not read again
    other = pki.credentials("api")
    change(chain, other.chain_pem)
    change(key, other.key_pem)
    renewed = source.current()
    assert renewed is not good and renewed is not None and renewed.chain_pem == other.chain_pem


SLOW_APP = """
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(float(self.path.rsplit("/", 1)[1]))
        self.send_response(200)
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"slept")
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def _exchange(sock: socket.socket, path: str) -> bytes:
    """One keep-alive request on ``sock``; the answer read to its 5-byte body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b"slept"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def test_sigterm_drains_the_requests_in_progress(pki, tmp_path, procs) -> None:
    """A proxy told to stop (SIGTERM) takes no new connection, answers the requests it has in
    progress (saying ``connection: close``), closes idle connections at once, and exits as
    soon as they are done, well inside its shutdown grace. Before, it exited at once and the
    requests in progress were cut."""
    app_port, api_id, api, inbound = _app_behind_proxy(SLOW_APP, pki, tmp_path, procs)
    web_id, web_files = _write_identity(pki, tmp_path, "web")
    zero = {"host": "127.0.0.1", "port": 0}

    def web() -> tuple[subprocess.Popen[str], int]:
        cfg = tmp_path / "web.yaml"
        cfg.write_text(yaml.safe_dump({
            "identity": web_id, "credentials": web_files, "outbound": zero, "admin": zero,
            "inbound": zero, "shutdown_grace": 20,
            "routes": {"services": [{"name": "api", "endpoints": [
                {"host": "127.0.0.1", "port": app_port, "identity": api_id,
                 "proxy_port": inbound}]}]},
        }))  # fmt: skip
        proc = _start([sys.executable, "-m", "proxy", "--config", str(cfg)])
        procs.append(proc)
        return proc, json.loads(_first_line(proc))["outbound"]

    # The outbound proxy stops with a request in progress and an idle keep-alive connection.
    client, outbound = web()
    with (
        socket.create_connection(("127.0.0.1", outbound), timeout=10) as busy,
        socket.create_connection(("127.0.0.1", outbound), timeout=10) as idle,
    ):
        assert _exchange(idle, "/0").startswith(b"HTTP/1.1 200")
        busy.sendall(b"GET /1.0 HTTP/1.1\r\nHost: api\r\n\r\n")
        time.sleep(0.3)  # the request is at the app
        started = time.monotonic()
        client.send_signal(signal.SIGTERM)
        assert idle.recv(1) == b""  # closed at once, not after the grace
        reply = b""
        while chunk := busy.recv(65536):
            reply += chunk  # to EOF: the proxy closes after this answer
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slept"), reply
        assert b"\r\nconnection: close\r\n" in reply.lower()
        assert client.wait(timeout=10) == 0
        assert time.monotonic() - started < 5  # done when the answer was, not at the grace
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", outbound), timeout=2).close()

    # The inbound proxy stops with a request in progress from the other proxy's pool.
    client, outbound = web()
    with socket.create_connection(("127.0.0.1", outbound), timeout=10) as sock:
        sock.sendall(b"GET /1.0 HTTP/1.1\r\nHost: api\r\n\r\n")
        time.sleep(0.3)
        api.send_signal(signal.SIGTERM)
        reply = b""
        while not reply.endswith(b"slept"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
    assert api.wait(timeout=10) == 0
