"""The demo's workloads, written with the standard library only.

``http``: a small HTTP/1.1 service. ``GET /`` answers with its name and, when it has a ``--next``
hop, first calls that hop (through its sidecar's upstream listener) and includes the answer, so
a request to the first service walks the whole chain. ``GET /health`` answers without calling on.
``tcp-echo``: an opaque TCP service that echoes every byte until the client half-closes.

Run as ``python -m trustmesh.demo.apps http --name web --listen 127.0.0.1:18080 --next
http://127.0.0.1:24001/``.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_http_handler(name: str, next_url: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"trustmesh-demo-{name}"
        # Head and body are separate writes: without TCP_NODELAY the body waits ~40 ms for
        # the proxy's delayed ACK.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path == "/health" or next_url is None:
                self._reply(200, {"service": name, "client": self.headers.get("l5d-client-id")})
                return
            try:
                with urllib.request.urlopen(next_url, timeout=5) as r:
                    downstream = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                self._reply(502, {"service": name, "error": f"calling {next_url}: {e}"})
                return
            self._reply(
                200,
                {
                    "service": name,
                    "client": self.headers.get("l5d-client-id"),
                    "next": downstream,
                },
            )

        def _reply(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the proxies report traffic; the demo apps stay quiet

    return Handler


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while chunk := sock.recv(65536):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)


# socketserver listens with a backlog of 5. A proxy whose pool is empty dials its app once per
# request at the start of a burst; beyond 5 connections not yet accepted, the kernel drops the
# SYN and resends it after 1 s, which is the proxy's connect timeout: wrk with 32 connections
# through the demo chain got a 502 ("connecting to ... timed out after 1.0s") now and then.
LISTEN_BACKLOG = 1024


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


def make_server(argv: list[str]) -> socketserver.TCPServer:
    """The server the command line asks for, listening (not yet serving)."""
    parser = argparse.ArgumentParser(prog="trustmesh.demo.apps")
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http")
    http.add_argument("--name", required=True)
    http.add_argument("--listen", required=True)
    http.add_argument("--next", dest="next_url")
    tcp = sub.add_parser("tcp-echo")
    tcp.add_argument("--listen", required=True)
    args = parser.parse_args(argv)
    if args.kind == "http":
        return HTTPServer(_split(args.listen), make_http_handler(args.name, args.next_url))
    return ThreadingTCPServer(_split(args.listen), EchoHandler)


def main(argv: list[str] | None = None) -> int:
    server = make_server(sys.argv[1:] if argv is None else argv)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
