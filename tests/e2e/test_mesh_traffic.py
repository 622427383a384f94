"""The mesh end to end with the real control plane: identity and destination (both ``--tls``),
five ``trustmesh proxy run`` sidecars and stdlib apps, all real processes.

curl -> client proxy (outbound, Host routing) -> mesh TLS -> server proxy (inbound) -> app;
opaque TCP through an upstream listener; HTTP and TCP denials from the destination's Server /
AuthorizationPolicy; a peer answering with another identity than destination promised; the
destination service stopped (traffic keeps flowing) and restarted (updates flow again).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mesh_testkit import (
    HOST,
    MeshKit,
    ProxyPorts,
    curl,
    echo_session,
    eventually,
    http_status,
    identity_of,
    metric,
    roundtrip,
    service_doc,
    workload_doc,
)

from pki.certs import load_pem_chain
from pki.names import control_plane_identity
from trustmesh.supervisor import trustmesh_argv

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

NS = "e2e"
WEB = f"web.{NS}.svc.cluster.local:8080"
ECHO = f"echo.{NS}.svc.cluster.local:7000"
GUARDED = f"guarded.{NS}.svc.cluster.local:8080"
GUARDED_TCP = f"guarded-tcp.{NS}.svc.cluster.local:7000"
IMPOSTOR = f"impostor.{NS}.svc.cluster.local:8080"


def _policy(kind: str, name: str, spec: dict):
    return {
        "apiVersion": "policy.trustmesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


class Mesh:
    def __init__(self, kit: MeshKit, mesh_file: Path, docs: list, proxies: dict[str, ProxyPorts]):
        self.kit, self.mesh_file, self.docs, self.proxies = kit, mesh_file, docs, proxies

    def write(self, docs: list) -> None:
        tmp = self.mesh_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(docs))
        os.replace(tmp, self.mesh_file)

    @property
    def client(self) -> ProxyPorts:
        return self.proxies["client-0"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    kit = MeshKit(root / "home")
    try:
        web_app, echo_app, g_http, g_tcp, rogue_app, impostor_app = kit.ports(6)
        proxies = {
            "client-0": kit.proxy_ports(ECHO, GUARDED_TCP),
            "web-0": kit.proxy_ports(),
            "echo-0": kit.proxy_ports(),
            "guarded-0": kit.proxy_ports(),
            "rogue-0": kit.proxy_ports(),
        }
        rogue_inbound = proxies["rogue-0"].inbound
        docs = [
            workload_doc("client-0", NS, "client", proxies["client-0"].inbound, {}),
            workload_doc("web-0", NS, "web", proxies["web-0"].inbound, {"http": web_app}),
            service_doc("web", NS, "web", 8080, "http"),
            workload_doc(
                "echo-0", NS, "echo", proxies["echo-0"].inbound, {"echo": echo_app}, echo_app
            ),
            service_doc("echo", NS, "echo", 7000, "echo"),
            workload_doc(
                "guarded-0",
                NS,
                "guarded",
                proxies["guarded-0"].inbound,
                {"http": g_http, "echo": g_tcp},
                g_tcp,
            ),
            service_doc("guarded", NS, "guarded", 8080, "http"),
            service_doc("guarded-tcp", NS, "guarded", 7000, "echo"),
            _policy(
                "Server",
                "guarded-http",
                {
                    "podSelector": {"matchLabels": {"app": "guarded"}},
                    "port": "http",
                    "proxyProtocol": "HTTP/1",
                },
            ),
            _policy(
                "Server",
                "guarded-tcp",
                {
                    "podSelector": {"matchLabels": {"app": "guarded"}},
                    "port": "echo",
                    "proxyProtocol": "opaque",
                },
            ),
            _policy(
                "MeshTLSAuthentication",
                "only-admin",
                {
                    "identityRefs": [{"kind": "ServiceAccount", "name": "admin"}],
                },
            ),
            *(
                _policy(
                    "AuthorizationPolicy",
                    f"{server}-admin",
                    {
                        "targetRef": {
                            "group": "policy.trustmesh.io",
                            "kind": "Server",
                            "name": server,
                        },
                        "requiredAuthenticationRefs": [
                            {
                                "group": "policy.trustmesh.io",
                                "kind": "MeshTLSAuthentication",
                                "name": "only-admin",
                            },
                        ],
                    },
                )
                for server in ("guarded-http", "guarded-tcp")
            ),
            # The rogue proxy (identity "rogue") answers at the address destination gives for
            # the impostor workload, which destination says is service account "api".
            workload_doc("rogue-0", NS, "rogue", rogue_inbound, {"http": rogue_app}),
            workload_doc("impostor-0", NS, "api", rogue_inbound, {"http": impostor_app}),
            service_doc("impostor", NS, "impostor", 8080, "http"),
        ]
        mesh_file = root / "mesh.yaml"
        m = Mesh(kit, mesh_file, docs, proxies)
        m.write(docs)
        with kit.together():
            kit.start_identity()
            kit.start_destination(mesh_file)
        with kit.together():
            kit.start_app("web", "http", "--name", "web", "--listen", f"{HOST}:{web_app}")
            kit.start_app("echo", "tcp-echo", "--listen", f"{HOST}:{echo_app}")
            kit.start_app("guarded", "http", "--name", "guarded", "--listen", f"{HOST}:{g_http}")
            kit.start_app("guarded-tcp", "tcp-echo", "--listen", f"{HOST}:{g_tcp}")
            kit.start_app("rogue", "http", "--name", "rogue", "--listen", f"{HOST}:{rogue_app}")
            kit.start_proxy("client-0", NS, "client", proxies["client-0"])
            kit.start_proxy("web-0", NS, "web", proxies["web-0"], (web_app,))
            kit.start_proxy("echo-0", NS, "echo", proxies["echo-0"], (echo_app,))
            kit.start_proxy("guarded-0", NS, "guarded", proxies["guarded-0"], (g_http, g_tcp))
            kit.start_proxy("rogue-0", NS, "rogue", proxies["rogue-0"], (rogue_app,))
        yield m
    finally:
        kit.close()


def test_curl_through_outbound_proxy_mesh_tls_and_inbound_proxy(mesh: Mesh) -> None:
    status, headers, body = curl(mesh.client.outbound, WEB)
    assert status == 200, (headers, body)
    answer = json.loads(body)
    assert answer == {"service": "web", "client": identity_of("client", NS)}
    # Short names resolve in the proxy's own namespace, Kubernetes-style.
    assert curl(mesh.client.outbound, "web.e2e:8080")[0] == 200
    admin = mesh.client.admin_addr
    assert metric(admin, "tls_handshakes_total", direction="outbound",
                  group="X25519MLKEM768", result="ok") >= 1  # fmt: skip
    web_admin = mesh.proxies["web-0"].admin_addr
    assert metric(web_admin, "request_total", direction="inbound",
                  client_id=identity_of("client", NS)) >= 2  # fmt: skip
    assert metric(admin, "identity_cert_expiration_timestamp_seconds") > 0
    assert metric(admin, "trustmesh_proxy_trust_bundle_info", source="destination") == 1
    # The control plane's connections negotiated the hybrid group too, and none failed.
    control = "trustmesh_proxy_control_plane_tls_handshakes_total"
    for component in ("identity", "destination"):
        server = control_plane_identity(component).dns_name
        assert metric(admin, control, server=server, group="X25519MLKEM768", result="ok") >= 1
    assert metric(admin, control) == metric(admin, control, result="ok")


def test_components_publish_expiry_metrics_and_trustmesh_check_passes(mesh: Mesh) -> None:
    kit, client = mesh.kit, mesh.client
    id_admin, dst_admin = f"{HOST}:{kit.id_admin}", f"{HOST}:{kit.dst_admin}"
    # The alert rules' families, straight from the components (not only from the exporter).
    now = time.time()
    workload_expiry = metric(
        client.admin_addr, "trustmesh_cert_not_after_timestamp_seconds", role="workload"
    )
    assert now < workload_expiry <= now + 24 * 3600 + 60
    assert metric(client.admin_addr, "trustmesh_cert_renewal_due_timestamp_seconds") < (
        workload_expiry
    )
    assert metric(id_admin, "trustmesh_cert_not_after_timestamp_seconds", role="issuer") > now
    assert metric(id_admin, "trustmesh_cert_not_after_timestamp_seconds", role="trust_anchor") > now
    digest = kit.home.store.trust_bundle().digest
    assert metric(client.admin_addr, "trustmesh_proxy_trust_bundle_info", digest=digest) == 1
    assert metric(id_admin, "trustmesh_trust_bundle_info", digest=digest) == 1

    proc = subprocess.run(
        [
            *trustmesh_argv("check"),
            *("--store", str(kit.home.root), "--identity", id_admin),
            *("--destination", dst_admin, "--proxy", client.admin_addr, "-o", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(proc.stdout)
    failed = [c for cat in report["categories"] for c in cat["checks"] if c["result"] == "error"]
    assert proc.returncode == 0 and report["success"], failed
    names = {cat["categoryName"] for cat in report["categories"]}
    assert any("identity" in n for n in names) and any("data-plane" in n for n in names), names

    # The proxy reports the certificate it presents; the cron checker reads it from there.
    with urllib.request.urlopen(f"http://{client.admin_addr}/certificate", timeout=5) as r:
        leaf = load_pem_chain(r.read())[0]
    assert leaf.dns_names == (identity_of("client", NS),)
    proc = subprocess.run(
        [
            *trustmesh_argv("alerts", "check", "--store", str(kit.home.root)),
            *("--proxy", client.admin_addr, "-o", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert leaf.fingerprint in proc.stdout


def test_opaque_tcp_through_an_upstream_listener(mesh: Mesh) -> None:
    payload = os.urandom(200_000)
    assert echo_session(mesh.client.upstreams[ECHO], payload) == payload
    echo_admin = mesh.proxies["echo-0"].admin_addr
    assert metric(echo_admin, "inbound_tcp_authz_allow_total") >= 1


def test_policy_denies_http_with_403_and_reason_and_closes_tcp(mesh: Mesh) -> None:
    status, headers, _ = curl(mesh.client.outbound, GUARDED)
    assert status == 403
    reason = headers["l5d-proxy-error"]
    assert identity_of("client", NS) in reason and "guarded-http" in reason
    try:
        answer = echo_session(mesh.client.upstreams[GUARDED_TCP], b"let me in")
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    admin = mesh.proxies["guarded-0"].admin_addr
    denied = {"srv_name": "guarded-http", "client_id": identity_of("client", NS)}
    assert metric(admin, "inbound_http_authz_deny_total", reason="unauthorized", **denied) >= 1
    assert metric(admin, "inbound_tcp_authz_deny_total", srv_name="guarded-tcp") >= 1


def test_peer_presenting_another_identity_is_refused(mesh: Mesh) -> None:
    status, headers, _ = curl(mesh.client.outbound, IMPOSTOR)
    assert status == 502
    assert identity_of("api", NS) in headers["l5d-proxy-error"]
    rogue = mesh.proxies["rogue-0"].admin_addr
    assert metric(rogue, "request_total") == 0  # nothing reached the rogue's application
    assert metric(rogue, "tls_handshakes_total", direction="inbound", result="ok") == 0


def test_proxy_serves_nothing_before_its_first_certificate(mesh: Mesh) -> None:
    kit = mesh.kit
    ports = kit.proxy_ports()
    nowhere = kit.ports(1)[0]  # no identity service listens here
    kit.start_proxy(
        "orphan-0", NS, "orphan", ports,
        extra=("--identity-addr", f"{HOST}:{nowhere}"), ready_path="/live",
    )  # fmt: skip
    try:
        assert http_status(ports.admin_addr, "/ready") == 503
        for port in (ports.outbound, ports.inbound):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=2).close()
        assert metric(ports.admin_addr, "trustmesh_proxy_identity_info", ready="0") == 1
        # The first attempt may still be in flight when /live answers: wait for it to fail.
        eventually(
            lambda: metric(ports.admin_addr, "identity_cert_refreshes_total", result="error") >= 1,
            10,
            "the first certificate request failing",
        )
    finally:
        kit.stop("proxy-orphan-0")


def test_a_stopping_sidecar_is_not_ready_while_it_drains(mesh: Mesh) -> None:
    """SIGTERM to ``trustmesh proxy run``: /ready turns 503 at once (so a kubelet or ``up``
    stops sending it traffic) while /live stays 200; new connections are refused; an opaque
    stream in progress runs on until the shutdown grace, and then the process exits 0."""
    kit = mesh.kit
    ports = kit.proxy_ports(ECHO)
    kit.start_proxy("drainer-0", NS, "client", ports, extra=("--shutdown-grace", "3"))
    (proc,) = (c.proc for c in kit.supervisor.children if c.spec.name == "proxy-drainer-0")
    try:
        with socket.create_connection((HOST, ports.upstreams[ECHO]), timeout=10) as sock:
            assert roundtrip(sock, b"before") == b"before"
            assert http_status(ports.admin_addr, "/ready") == 200
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            eventually(
                lambda: http_status(ports.admin_addr, "/ready") == 503, 5, "/ready turning 503"
            )
            assert http_status(ports.admin_addr, "/live") == 200
            with pytest.raises(OSError):
                socket.create_connection((HOST, ports.upstreams[ECHO]), timeout=2).close()
            assert roundtrip(sock, b"during the drain") == b"during the drain"
            assert proc.wait(timeout=15) == 0
            assert time.monotonic() - started >= 2.5  # the stream held it to its grace
            with pytest.raises(ConnectionResetError):  # cut (reset) at the grace
                sock.recv(1)
    finally:
        kit.stop("proxy-drainer-0")


SLOW_APP = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
seen = set()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(2 if self.path.startswith("/slow") else 0)
        first = self.path.startswith("/once-503") and self.path not in seen
        seen.add(self.path)
        self.send_response(503 if first else 200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_route_timeouts_from_the_mesh_file_answer_504(mesh: Mesh) -> None:
    """An HTTPRoute's timeout and retry annotation in the mesh file reach the client's sidecar
    through destination's outbound policy: a request past the timeout is answered 504 by the
    proxy, one on another rule is not limited, a 503 is retried; an edit lifting the timeout
    follows."""
    kit = mesh.kit
    (app_port,) = kit.ports(1)
    ports = kit.proxy_ports()
    slow = f"slow.{NS}.svc.cluster.local:8080"
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": "slow-routes",
            "namespace": NS,
            "annotations": {"retry.linkerd.io/http": "5xx"},
        },
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "slow", "port": 8080}],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                 "timeouts": {"request": "500ms"}},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
            ],
        },
    }  # fmt: skip
    workload = [
        workload_doc("slow-0", NS, "slow", ports.inbound, {"http": app_port}),
        service_doc("slow", NS, "slow", 8080, "http"),
    ]
    mesh.write([*mesh.docs, *workload, route])
    with kit.together():
        kit.start_script("slow", SLOW_APP, app_port)
        kit.start_proxy("slow-0", NS, "slow", ports, (app_port,))
    try:
        # Destination publishes the new service within its file poll; the first request that
        # finds it has waited for its policy too, so the timeout applies from then on.
        eventually(lambda: curl(mesh.client.outbound, slow, "/fast")[0] == 200, 15, "slow known")
        started = time.monotonic()
        status, headers, _ = curl(mesh.client.outbound, slow, "/slow")
        assert status == 504 and time.monotonic() - started < 1.5
        assert headers["l5d-proxy-error"] == (
            "no response within the route's request timeout of 0.5s"
        )
        # The route's retry annotation: a first 503 is sent again, the client sees the 200.
        assert curl(mesh.client.outbound, slow, "/once-503/a")[0] == 200
        mesh.write([*mesh.docs, *workload])  # the route (and its timeout) gone
        eventually(
            lambda: curl(mesh.client.outbound, slow, "/slow")[0] == 200, 15, "the edit applied"
        )
    finally:
        mesh.write(mesh.docs)
        kit.stop("proxy-slow-0")
        kit.stop("app-slow")


def test_traffic_continues_while_destination_is_down_and_recovers(mesh: Mesh) -> None:
    kit, client = mesh.kit, mesh.client
    kit.stop("destination")
    eventually(
        lambda: metric(client.admin_addr, "trustmesh_destination_client_control_plane_up") == 0,
        20,
        "the client proxy noticing destination is gone",
    )
    # Last-known endpoints and policy: HTTP and new mesh connections keep working.
    for _ in range(3):
        assert curl(client.outbound, WEB)[0] == 200
        payload = os.urandom(10_000)
        assert echo_session(client.upstreams[ECHO], payload) == payload
    assert curl(client.outbound, GUARDED)[0] == 403  # denials too

    kit.start_destination(mesh.mesh_file, name="destination-2")
    eventually(
        lambda: metric(client.admin_addr, "trustmesh_destination_client_control_plane_up") == 1,
        30,
        "the client proxy reconnecting to destination",
    )
    # Updates flow again: a deny-all Server on web's port is enforced, then removed.
    deny = _policy("Server", "web-closed", {
        "podSelector": {"matchLabels": {"app": "web"}}, "port": "http", "proxyProtocol": "HTTP/1",
    })  # fmt: skip
    mesh.write([*mesh.docs, deny])
    try:
        eventually(lambda: curl(client.outbound, WEB)[0] == 403, 20, "web denied by the new Server")
    finally:
        mesh.write(mesh.docs)
    eventually(lambda: curl(client.outbound, WEB)[0] == 200, 20, "web allowed again")
