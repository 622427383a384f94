"""The built-in demo mesh and the traffic that runs through it.

The mesh (namespace ``demo``, every port chosen free at run time)::

    traffic-0 ──HTTP──▶ web-0 ──▶ api-0 | api-1 ──▶ quote-0      (HTTP chain, 2 api replicas)
    traffic-0 ──TCP───▶ echo-0                                     (opaque TCP echo)

Each hop is proxy to proxy over mesh TLS. Policy is default-deny in spirit: every Server admits
only its caller's service account (web ← traffic, api ← web, quote ← api, echo ← traffic).
``traffic-0`` has a proxy but no application: the demo command itself drives requests into its
upstream listeners and checks every answer end to end (status, the whole chain, and the
``l5d-client-id`` each hop saw).
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.up.plan import ANNOTATION, HOST

NAMESPACE = "demo"
TRAFFIC = f"{NAMESPACE}/traffic-0"
HTTP_PORT = 8080
ECHO_PORT = 7000
MAX_LATENCIES = 100_000


def _identity(sa: str) -> str:
    return f"{sa}.{NAMESPACE}.serviceaccount.identity.trustmesh.cluster.local"


def _authority(service: str, port: int) -> str:
    return f"{service}.{NAMESPACE}.svc.cluster.local:{port}"


def demo_mesh(free: Iterator[int]) -> str:
    """The demo mesh file (YAML), with ports taken from ``free``."""
    docs: list[dict[str, Any]] = []
    py = "{python} -m trustmesh.demo.apps"

    def workload(
        name: str, app: str, sa: str, port: int | None, command: str, upstreams: list[str]
    ) -> None:
        annotations = {
            ANNOTATION + "admin-port": str(next(free)),
            ANNOTATION + "outbound-port": str(next(free)),
        }
        if command:
            annotations[ANNOTATION + "command"] = command
        if upstreams:
            annotations[ANNOTATION + "upstreams"] = ",".join(upstreams)
        spec: dict[str, Any] = {
            "serviceAccount": sa,
            "address": HOST,
            "inboundProxyPort": next(free),
        }
        if port is not None:
            spec["ports"] = [{"name": "echo" if app == "echo" else "http", "port": port}]
        if app == "echo":
            annotations["config.trustmesh.io/opaque-ports"] = str(port)
        docs.append(
            {
                "apiVersion": "trustmesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {
                    "name": name,
                    "namespace": NAMESPACE,
                    "labels": {"app": app},
                    "annotations": annotations,
                },
                "spec": spec,
            }
        )

    def upstream(service: str, port: int) -> tuple[str, str]:
        local = next(free)
        return f"http://{HOST}:{local}/", f"{HOST}:{local}={_authority(service, port)}"

    web_port = next(free)
    next_url, up = upstream("api", HTTP_PORT)
    workload(
        "web-0", "web", "web", web_port,
        f"{py} http --name web --listen {HOST}:{web_port} --next {next_url}", [up],
    )  # fmt: skip
    for i in range(2):
        port = next(free)
        next_url, up = upstream("quote", HTTP_PORT)
        workload(
            f"api-{i}", "api", "api", port,
            f"{py} http --name api-{i} --listen {HOST}:{port} --next {next_url}", [up],
        )  # fmt: skip
    port = next(free)
    workload(
        "quote-0", "quote", "quote", port, f"{py} http --name quote --listen {HOST}:{port}", []
    )
    port = next(free)
    workload("echo-0", "echo", "echo", port, f"{py} tcp-echo --listen {HOST}:{port}", [])
    _, web_up = upstream("web", HTTP_PORT)
    _, echo_up = upstream("echo", ECHO_PORT)
    workload("traffic-0", "traffic", "traffic", None, "", [web_up, echo_up])

    for service, port, target in (
        ("web", HTTP_PORT, "http"),
        ("api", HTTP_PORT, "http"),
        ("quote", HTTP_PORT, "http"),
        ("echo", ECHO_PORT, "echo"),
    ):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service, "namespace": NAMESPACE},
                "spec": {
                    "selector": {"app": service},
                    "ports": [{"port": port, "targetPort": target}],
                },
            }
        )
    for server, caller in (
        ("web", "traffic"),
        ("api", "web"),
        ("quote", "api"),
        ("echo", "traffic"),
    ):
        proto, port_name = ("opaque", "echo") if server == "echo" else ("HTTP/1", "http")
        docs += [
            _policy("Server", f"{server}-server", {
                "podSelector": {"matchLabels": {"app": server}},
                "port": port_name,
                "proxyProtocol": proto,
            }),
            _policy("MeshTLSAuthentication", f"{caller}-to-{server}", {
                "identityRefs": [{"kind": "ServiceAccount", "name": caller}],
            }),
            _policy("AuthorizationPolicy", f"{server}-from-{caller}", {
                "targetRef": {"group": "policy.trustmesh.io", "kind": "Server", "name": f"{server}-server"},
                "requiredAuthenticationRefs": [
                    {"group": "policy.trustmesh.io", "kind": "MeshTLSAuthentication",
                     "name": f"{caller}-to-{server}"},
                ],
            }),
        ]  # fmt: skip
    return yaml.safe_dump_all(docs, sort_keys=False)


def _policy(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "policy.trustmesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def check_chain(body: bytes) -> str:
    """Validate one answer of the HTTP chain; returns the api replica that served it.

    Raises ValueError naming what is wrong (a hop missing, or a caller identity not the one the
    policy admits).
    """
    doc = json.loads(body)
    expect = (("web", "traffic"), ("api", "web"), ("quote", "api"))
    replica = ""
    for service, caller in expect:
        if not isinstance(doc, dict):
            raise ValueError(f"the {service} hop is missing from the answer")
        name = str(doc.get("service", ""))
        if name.split("-")[0] != service:
            raise ValueError(f"expected the {service} hop, got {name or 'nothing'}")
        if doc.get("client") != _identity(caller):
            raise ValueError(f"{name} saw client {doc.get('client')!r}, not {caller}'s identity")
        if service == "api":
            replica = name
        doc = doc.get("next")
    return replica


@dataclass
class Tally:
    """What the traffic generator did (guarded by ``lock``)."""

    http_requests: int = 0
    http_failures: int = 0
    tcp_sessions: int = 0
    tcp_failures: int = 0
    tcp_bytes: int = 0
    replicas: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, what: str, error: str) -> None:
        with self.lock:
            if what == "http":
                self.http_failures += 1
            else:
                self.tcp_failures += 1
            if len(self.errors) < 20:
                self.errors.append(f"{what}: {error}")

    def summary(self) -> dict[str, Any]:
        with self.lock:
            ordered = sorted(self.latencies_ms)

            def pct(q: float) -> float | None:
                if not ordered:
                    return None
                return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

            return {
                "requests": self.http_requests + self.tcp_sessions,
                "failures": self.http_failures + self.tcp_failures,
                "http": {
                    "requests": self.http_requests,
                    "failures": self.http_failures,
                    "p50_ms": pct(0.5),
                    "p99_ms": pct(0.99),
                    "api_replicas": dict(sorted(self.replicas.items())),
                },
                "tcp": {
                    "sessions": self.tcp_sessions,
                    "failures": self.tcp_failures,
                    "bytes_echoed": self.tcp_bytes,
                },
                "errors": list(self.errors),
            }


class Traffic:
    """Paced HTTP requests and TCP echo sessions into the traffic workload's upstreams."""

    def __init__(
        self,
        web: tuple[str, int],
        echo: tuple[str, int],
        *,
        http_rate: float = 20.0,
        tcp_rate: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        if http_rate <= 0 or tcp_rate <= 0:
            raise ValueError("traffic rates must be positive")
        self.web, self.echo = web, echo
        self.http_rate, self.tcp_rate = http_rate, tcp_rate
        self.clock = clock
        self.rng = random.Random(seed)
        self.tally = Tally()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._http_loop, args=(i,), daemon=True) for i in range(2)
        ] + [threading.Thread(target=self._tcp_loop, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        deadline = self.clock() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - self.clock()))

    def _paced(self, interval: float) -> Iterator[None]:
        next_at = self.clock()
        while not self._stop.is_set():
            yield
            next_at += interval
            delay = next_at - self.clock()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = self.clock()  # fell behind: do not burst to catch up

    def _http_loop(self, worker: int) -> None:
        conn: http.client.HTTPConnection | None = None
        for _ in self._paced(2 / self.http_rate):
            started = self.clock()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(*self.web, timeout=10)
                conn.request("GET", "/", headers={"x-demo-worker": str(worker)})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    reason = response.getheader("l5d-proxy-error") or body[:200].decode("latin-1")
                    raise ValueError(f"HTTP {response.status}: {reason}")
                replica = check_chain(body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                if conn is not None:
                    conn.close()
                conn = None
                with self.tally.lock:
                    self.tally.http_requests += 1
                self.tally.failed("http", str(e) or type(e).__name__)
                continue
            elapsed = (self.clock() - started) * 1000.0
            with self.tally.lock:
                self.tally.http_requests += 1
                self.tally.replicas[replica] = self.tally.replicas.get(replica, 0) + 1
                if len(self.tally.latencies_ms) < MAX_LATENCIES:
                    self.tally.latencies_ms.append(elapsed)
        if conn is not None:
            conn.close()

    def _tcp_loop(self) -> None:
        for _ in self._paced(1 / self.tcp_rate):
            payload = self.rng.randbytes(self.rng.randint(1, 16384))
            with self.tally.lock:
                self.tally.tcp_sessions += 1
            try:
                with socket.create_connection(self.echo, timeout=10) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    received = bytearray()
                    while chunk := s.recv(65536):
                        received += chunk
                if bytes(received) != payload:
                    raise ValueError(f"echoed {len(received)} bytes, sent {len(payload)}")
            except (OSError, ValueError) as e:
                self.tally.failed("tcp", str(e) or type(e).__name__)
                continue
            with self.tally.lock:
                self.tally.tcp_bytes += len(payload)
