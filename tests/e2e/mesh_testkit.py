"""Real processes for the mesh end-to-end tests: a local PKI, ``trustmesh identity serve --tls``,
``trustmesh destination serve --tls``, ``trustmesh proxy run`` sidecars and the stdlib demo
apps, each started by the test and stopped in its fixture's ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pki.certs import utcnow
from trustmesh.supervisor import ChildSpec, ReadyCheck, Supervisor, free_ports, trustmesh_argv
from trustmesh.up.home import Home, ensure_pki, write_token
from trustmesh.up.runtime import start_all

HOST = "127.0.0.1"
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, AssertionError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


def identity_of(sa: str, ns: str) -> str:
    return f"{sa}.{ns}.serviceaccount.identity.trustmesh.cluster.local"


def workload_doc(
    name: str,
    ns: str,
    sa: str,
    inbound: int,
    ports: dict[str, int],
    opaque: int | None = None,
) -> dict[str, Any]:
    """A mesh-file Workload ``name`` labelled ``app=<name without its -N suffix>``."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "labels": {"app": name.rsplit("-", 1)[0]},
    }
    if opaque is not None:
        meta["annotations"] = {"config.trustmesh.io/opaque-ports": str(opaque)}
    spec: dict[str, Any] = {"serviceAccount": sa, "address": HOST, "inboundProxyPort": inbound}
    if ports:
        spec["ports"] = [{"name": n, "port": p} for n, p in ports.items()]
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": meta,
        "spec": spec,
    }


def service_doc(name: str, ns: str, app: str, port: int, target: str) -> dict[str, Any]:
    """A mesh-file Service selecting ``app=<app>``, ``port`` to the workloads' port ``target``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": target}]},
    }


@dataclass
class ProxyPorts:
    inbound: int
    outbound: int
    admin: int
    upstreams: dict[str, int] = field(default_factory=dict)  # authority -> local port

    @property
    def admin_addr(self) -> str:
        return f"{HOST}:{self.admin}"


class MeshKit:
    """A home with a PKI, and the processes of one test mesh."""

    def __init__(self, root: Path) -> None:
        self.home = Home(root)
        ensure_pki(self.home, now=utcnow())
        self.supervisor = Supervisor(self.home.logs)
        # One allocation for the whole mesh, so no two calls hand out the same free port.
        self._free = iter(free_ports(80))
        self.id_port, self.id_admin, self.dst_port, self.dst_admin = self.ports(4)
        self.specs: dict[str, ChildSpec] = {}
        self._batch: list[ChildSpec] | None = None

    def ports(self, n: int) -> list[int]:
        return [next(self._free) for _ in range(n)]

    def proxy_ports(self, *authorities: str) -> ProxyPorts:
        inbound, outbound, admin = self.ports(3)
        return ProxyPorts(inbound, outbound, admin, {a: next(self._free) for a in authorities})

    def _start(self, spec: ChildSpec) -> None:
        spec = dataclasses.replace(spec, restart=False, env={"PYTHONUNBUFFERED": "1"})
        self.specs[spec.name] = spec
        if self._batch is not None:
            self._batch.append(spec)
        else:
            start_all(self.supervisor, [spec], 60)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Start everything requested inside the block at once, then wait until all are ready."""
        self._batch = []
        try:
            yield
            start_all(self.supervisor, self._batch, 90)
        finally:
            self._batch = None

    def start_identity(self, *extra: str) -> None:
        self._start(
            ChildSpec(
                "identity",
                trustmesh_argv(
                    "identity",
                    "serve",
                    "--tls",
                    "--store",
                    str(self.home.root),
                    "--listen",
                    f"{HOST}:{self.id_port}",
                    "--admin-listen",
                    f"{HOST}:{self.id_admin}",
                    *extra,
                ),
                ReadyCheck((HOST, self.id_admin)),
            )
        )

    def start_destination(self, mesh_file: Path, name: str = "destination") -> None:
        self._start(
            ChildSpec(
                name,
                trustmesh_argv(
                    "destination",
                    "serve",
                    "--tls",
                    "--store",
                    str(self.home.root),
                    "--mesh-file",
                    str(mesh_file),
                    "--listen",
                    f"{HOST}:{self.dst_port}",
                    "--admin-listen",
                    f"{HOST}:{self.dst_admin}",
                ),
                ReadyCheck((HOST, self.dst_admin)),
            )
        )

    def stop(self, name: str) -> None:
        """SIGTERM one child and wait for it (the others keep running)."""
        for child in self.supervisor.children:
            if child.spec.name == name and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(5)

    def start_app(self, name: str, *args: str) -> None:
        listen = args[args.index("--listen") + 1]
        host, port = listen.rsplit(":", 1)
        argv = (sys.executable, "-m", "trustmesh.demo.apps", *args)
        self._start(ChildSpec(f"app-{name}", argv, ReadyCheck((host, int(port)), None)))

    def start_script(self, name: str, script: str, port: int) -> None:
        """Python ``script`` (given the port as its argument) as app ``name``, ready when it
        accepts on ``port``."""
        argv = (sys.executable, "-c", script, str(port))
        self._start(ChildSpec(f"app-{name}", argv, ReadyCheck((HOST, port), None)))

    def start_proxy(
        self,
        workload: str,
        ns: str,
        sa: str,
        ports: ProxyPorts,
        app_ports: tuple[int, ...] = (),
        *,
        extra: tuple[str, ...] = (),
        ready_path: str = "/ready",
    ) -> None:
        token = write_token(self.home, ns, sa, now=utcnow())
        args = [
            "proxy", "run", "--workload", workload, "--namespace", ns,
            "--service-account", sa, "--token-file", str(token),
            "--trust-anchors", str(self.home.anchors),
            "--identity-addr", f"{HOST}:{self.id_port}",
            "--destination-addr", f"{HOST}:{self.dst_port}",
            "--inbound-listen", f"{HOST}:{ports.inbound}",
            "--outbound-listen", f"{HOST}:{ports.outbound}",
            "--admin-listen", ports.admin_addr,
        ]  # fmt: skip
        for port in app_ports:
            args += ["--app-port", str(port)]
        for authority, port in ports.upstreams.items():
            args += ["--upstream", f"{HOST}:{port}={authority}"]
        args += extra  # later flags win
        self._start(
            ChildSpec(
                f"proxy-{workload}",
                trustmesh_argv(*args),
                ReadyCheck((HOST, ports.admin), ready_path),
            )
        )

    def log(self, name: str) -> str:
        path = self.home.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.supervisor.stop(timeout=10)


def metric(admin: str, name: str, **labels: str) -> float:
    """The sum of ``name`` samples on ``admin``'s /metrics whose labels include ``labels``."""
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=3) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def http_status(admin: str, path: str) -> int:
    """The HTTP status of GET ``path`` on an admin server."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def curl(port: int, host_header: str, path: str = "/") -> tuple[int, dict[str, str], str]:
    """GET through a proxy's outbound port with curl; (status, lower-cased headers, body)."""
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", "-H", f"Host: {host_header}",
         f"http://{HOST}:{port}{path}"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"curl failed: {out.stderr.strip()}"
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def echo_session(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload``, half-close, and return everything read until the server closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := s.recv(65536):
            received += chunk
    return bytes(received)


def fixture_kit(root: Path) -> Iterator[MeshKit]:
    """A fixture body: a kit under ``root``, closed afterwards."""
    kit = MeshKit(root)
    try:
        yield kit
    finally:
        kit.close()


def short_lived_mesh(root: Path, ns: str) -> Iterator[tuple[MeshKit, dict[str, ProxyPorts]]]:
    """A fixture body: :func:`short_lived_echo_pair` in a kit under ``root``, closed afterwards."""
    kit = MeshKit(root / "home")
    try:
        yield kit, short_lived_echo_pair(kit, root, ns)
    finally:
        kit.close()


# identity serve flags for 15 s workload certificates: NotAfter = now + lifetime + skew.
SHORT_LIVED_CERTS = ("--issuance-lifetime", "14s", "--clock-skew", "1s")


def short_lived_echo_pair(kit: MeshKit, root: Path, ns: str) -> dict[str, ProxyPorts]:
    """Identity with 15 s workload certificates (the proxies renew every ~10.5 s), destination,
    a TCP echo app, and two proxies: ``client-0`` (an upstream listener for the echo service)
    and ``echo-0`` (in front of the app). Returns the proxies' ports by workload."""
    echo = f"echo.{ns}.svc.cluster.local:7000"
    (app,) = kit.ports(1)
    proxies = {"client-0": kit.proxy_ports(echo), "echo-0": kit.proxy_ports()}
    docs = [
        workload_doc("client-0", ns, "client", proxies["client-0"].inbound, {}),
        workload_doc("echo-0", ns, "echo", proxies["echo-0"].inbound, {"echo": app}, app),
        service_doc("echo", ns, "echo", 7000, "echo"),
    ]
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump_all(docs))
    with kit.together():
        kit.start_identity(*SHORT_LIVED_CERTS)  # the proxies renew after ~10.5 s
        kit.start_destination(mesh_file)
    with kit.together():
        kit.start_app("echo", "tcp-echo", "--listen", f"{HOST}:{app}")
        kit.start_proxy("client-0", ns, "client", proxies["client-0"])
        kit.start_proxy("echo-0", ns, "echo", proxies["echo-0"], (app,))
    return proxies


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` on an open echo session and read the same number of bytes back."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed"
        got += chunk
    return got
