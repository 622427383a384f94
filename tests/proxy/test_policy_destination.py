"""Inbound policy from a real destination service (mesh file -> gRPC stream -> the proxy's
DestinationPolicy): a revoked authorization reaches the proxy, and an outage keeps the last
policy instead of falling back to the permissive default."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from destination_testlib import eventually, quick_client, write_atomic
from loopback import unused_port

import proxy.control as control_module
from destination.client import DestinationClient
from destination.paths import WorkloadRef
from destination.service import DestinationServer, ServeOptions
from proxy.control import DestinationPolicy, DestinationRoutes
from proxy.policy import DefaultPolicy, authorize
from proxy.routes import RouteRetry, RouteTimeouts
from proxy.rpc import Channel

pytestmark = pytest.mark.timeout(30)

WEB_ID = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
CLIENT = ipaddress.ip_address("10.1.2.3")
MESH = """\
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: api-0, namespace: shop, labels: {app: api}}
spec: {serviceAccount: api, address: 127.0.0.1, inboundProxyPort: 14143, ports: [{name: http, port: 18080}]}
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: Server
metadata: {name: api-http, namespace: shop}
spec: {podSelector: {matchLabels: {app: api}}, port: http, proxyProtocol: HTTP/1}
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: web-only, namespace: shop}
spec: {identityRefs: [{kind: ServiceAccount, name: web}]}
"""
GRANT = """\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-to-api, namespace: shop}
spec:
  targetRef: {group: policy.trustmesh.io, kind: Server, name: api-http}
  requiredAuthenticationRefs: [{kind: MeshTLSAuthentication, name: web-only}]
"""


@contextlib.asynccontextmanager
async def _destination(
    mesh: Path, workload: WorkloadRef
) -> AsyncIterator[tuple[DestinationServer, DestinationClient]]:
    """A plaintext destination service on ``mesh`` and a quick client of it, both stopped
    afterwards (stopping the server earlier is fine)."""
    port = unused_port()
    server = DestinationServer(
        ServeOptions(listen=f"127.0.0.1:{port}", admin_listen="127.0.0.1:0", mesh_file=mesh)
    )
    await server.start()
    client = quick_client(port, workload)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


async def test_revocation_reaches_the_proxy_and_an_outage_keeps_the_last_policy(
    tmp_path: Path,
) -> None:
    mesh = tmp_path / "mesh.yaml"
    write_atomic(mesh, MESH + GRANT)
    async with _destination(mesh, WorkloadRef("shop", "api-0")) as (server, client):
        policy = DestinationPolicy(client, [18080], DefaultPolicy.ALL_UNAUTHENTICATED)
        assert await policy.wait_ready(5) == []

        def web_allowed() -> bool:
            return authorize(policy.current(), 18080, WEB_ID, CLIENT).allowed

        assert web_allowed()
        assert not authorize(policy.current(), 18080, None, CLIENT).allowed
        # a port destination does not describe keeps the proxy's default
        assert authorize(policy.current(), 19090, None, CLIENT).allowed

        write_atomic(mesh, MESH)  # the AuthorizationPolicy is deleted
        await eventually(lambda: not web_allowed())
        decision = authorize(policy.current(), 18080, WEB_ID, CLIENT)
        assert decision.reason == "server api-http denies every client"

        await server.stop()
        await eventually(lambda: not client.control_plane_up)
        # the destination is away: still the revoked policy, not the permissive default
        assert not web_allowed()
        assert not authorize(policy.current(), 18080, None, CLIENT).allowed


async def test_a_cluster_default_without_configured_networks_uses_linkerds_cluster_networks() -> (
    None
):
    """``--default-inbound-policy cluster-authenticated`` with no networks given refused to
    start; Linkerd's clusterNetworks default applies instead."""
    client = DestinationClient(
        "127.0.0.1:1", channels=Channel, workload=WorkloadRef("shop", "api-0")
    )
    try:
        policy = DestinationPolicy(client, [18080], DefaultPolicy.CLUSTER_AUTHENTICATED)
        current = policy.current()
        assert authorize(current, 18080, WEB_ID, CLIENT).allowed  # 10.0.0.0/8
        assert not authorize(current, 18080, None, CLIENT).allowed
        outside = ipaddress.ip_address("203.0.113.7")
        assert not authorize(current, 18080, WEB_ID, outside).allowed
    finally:
        await client.close()


async def test_idle_service_watches_are_closed_so_new_services_stay_reachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every authority a proxy had once resolved kept its watch (a stream to the destination)
    for ever, so after MAX_WATCHED_SERVICES distinct names (typos and removed services count)
    no new service could be reached. Watches no lookup used for an idle period are closed;
    prefetched ones (upstream listeners) stay; a name used again resolves again."""
    monkeypatch.setattr(control_module, "MAX_WATCHED_SERVICES", 4)
    mesh = tmp_path / "mesh.yaml"
    service = (
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n"
        "spec: {selector: {app: api}, ports: [{port: 8080, targetPort: 18080}]}\n"
    )
    write_atomic(mesh, MESH + GRANT + service)
    async with _destination(mesh, WorkloadRef("shop", "web-0")) as (_, client):
        routes = DestinationRoutes(client, "shop", idle_timeout=0.3)
        assert await routes.prefetch(["api:8080"], 5) == []  # pinned
        for n in range(3):  # names that resolve to nothing fill the table
            wait = routes.resolving(f"gone-{n}:80")
            assert wait is not None
            await wait
        assert routes.watch("new-0:80") is None  # the bound: nothing more is resolved
        # two sweeps later the unused names are gone, and a new one can be watched
        await eventually(lambda: routes.watch("new-1:80") is not None, timeout=5)
        assert routes.by_authority("api:8080") is not None  # the prefetched one is kept
        # Closed and forgotten: the client keeps only the streams of the services still
        # watched, each with its endpoints and its outbound policy.
        await eventually(
            lambda: len(client._watches) == len(routes._watches) + len(routes._policies) <= 4,
            timeout=5,
        )
        assert set(routes._policies) == set(routes._watches)


ROUTED = """\
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
  annotations: {timeout.linkerd.io/response: 300ms}
spec: {selector: {app: api}, ports: [{port: 8080, targetPort: 18080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: api-routes
  namespace: shop
  annotations: {retry.linkerd.io/http: "502-504", retry.linkerd.io/limit: "25", retry.linkerd.io/timeout: 1s}
spec:
  parentRefs: [{kind: Service, name: api, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /reports}}]
    timeouts: {request: 5s}
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: x-tier, value: bulk}]}]
"""


async def test_route_timeouts_reach_the_proxy_and_follow_edits(tmp_path: Path) -> None:
    """The outbound policy of a service (HTTPRoute timeouts, the Service's timeout annotation
    as each rule's fallback) reaches the proxy's route table, and an edit follows."""
    mesh = tmp_path / "mesh.yaml"
    write_atomic(mesh, MESH + ROUTED)
    async with _destination(mesh, WorkloadRef("shop", "web-0")) as (_, client):
        # The first request's wait covers the policy too: the service has its rules at once,
        # whether it was resolved for a request or ahead of time (an upstream listener).
        routes = DestinationRoutes(client, "shop")
        wait = routes.resolving("api:8080")
        assert wait is not None
        await wait
        svc = routes.by_authority("api:8080")
        assert svc is not None and svc.rules
        ahead = DestinationRoutes(client, "shop")
        assert await ahead.prefetch(["api:8080"], 5) == []
        assert ahead.by_authority("api:8080").rules == svc.rules  # type: ignore[union-attr]
        assert svc.needs_headers and not svc.needs_query
        reports, bulk = svc.rules
        assert reports.route == "HTTPRoute shop/api-routes"
        assert reports.timeouts == RouteTimeouts(request=5.0, response=0.3)
        assert bulk.timeouts == RouteTimeouts(response=0.3)
        # The route's retry annotations, for each of its rules; the limit capped at 10.
        retry = RouteRetry(max_retries=10, status_ranges=((502, 504),), timeout=1.0)
        assert reports.retry == bulk.retry == retry
        assert reports.try_timeout == (0.3, "response")
        assert svc.rule_for("GET", "/reports/q3", {}, {}) is reports
        assert svc.rule_for("GET", "/reports/q3", {"x-tier": "bulk"}, {}) is reports  # longer
        assert svc.rule_for("GET", "/", {"x-tier": "bulk"}, {}) is bulk
        assert svc.rule_for("GET", "/", {}, {}) is None
        assert routes.by_authority("api:8080") is svc  # built once per change
        # Without any timeout the service has no rules: its requests are not matched at all.
        write_atomic(mesh, MESH + ROUTED.replace("timeout.linkerd.io/response: 300ms", "a: b")
                     .replace("    timeouts: {request: 5s}\n", "")
                     .replace("retry.linkerd.io", "x"))  # fmt: skip
        await eventually(lambda: routes.by_authority("api:8080").rules == ())  # type: ignore[union-attr]
        # A service that does not exist is an answer for its policy watch too, not an outage:
        # the client's control plane stays up (a stale watch would say it is down).
        wait = routes.resolving("gone:80")
        assert wait is not None
        await wait
        gone = routes._policies["gone.shop.svc.cluster.local:80"]
        await eventually(lambda: gone.current is not None)
        assert gone.current is not None and gone.current.routes == () and not gone.stale
        await eventually(lambda: client.metrics.up == 1)
