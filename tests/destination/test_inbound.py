"""Inbound policy resolution: every default policy, and Server/AuthorizationPolicy combinations."""

from __future__ import annotations

import pytest

from destination.errors import NotFound
from destination.inbound import resolve_inbound
from destination.meshfile import load_mesh_text
from destination.policy import Protocol
from destination.resources import MeshSettings

WORKLOAD = """\
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: api-0, namespace: shop, labels: {app: api}, annotations: %s}
spec: {serviceAccount: api, address: 10.0.0.9, inboundProxyPort: 4143, ports: [{name: http, port: 8080}]}
"""
WEB_ID = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
OTHER_ID = "web.other.serviceaccount.identity.trustmesh.cluster.local"
SETTINGS = MeshSettings()


def state(extra: str = "", annotations: str = "{}"):
    return load_mesh_text(WORKLOAD % annotations + extra)


@pytest.mark.parametrize(
    ("policy", "cases"),
    [
        ("all-unauthenticated", [("203.0.113.1", False, None, True)]),
        (
            "all-authenticated",
            [("203.0.113.1", False, None, False), ("203.0.113.1", True, WEB_ID, True)],
        ),
        (
            "cluster-unauthenticated",
            [("10.1.2.3", False, None, True), ("203.0.113.1", False, None, False)],
        ),
        (
            "cluster-authenticated",
            [
                ("10.1.2.3", True, WEB_ID, True),
                ("10.1.2.3", False, None, False),
                ("203.0.113.1", True, WEB_ID, False),
            ],
        ),
        ("deny", [("10.1.2.3", True, WEB_ID, False)]),
        ("audit", [("203.0.113.1", False, None, True)]),
    ],
)
def test_default_policies(policy: str, cases: list) -> None:
    for source in ("annotation", "meshconfig"):
        if source == "annotation":
            st = state(annotations=f"{{config.linkerd.io/default-inbound-policy: {policy}}}")
        else:
            st = state(
                f"---\napiVersion: trustmesh.io/v1alpha1\nkind: MeshConfig\nspec: {{defaultInboundPolicy: {policy}}}\n"
            )
        p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
        assert p.server.kind == "default" and p.server.name == policy
        assert p.protocol is Protocol.DETECT
        assert p.audit == (policy == "audit")
        for address, tls, identity, allowed in cases:
            assert p.permits(address, tls, identity) is allowed, (policy, address, identity)


def test_default_policy_opaque_port_and_unknown_workload() -> None:
    st = state(annotations="{config.linkerd.io/opaque-ports: '8080'}")
    assert resolve_inbound(st, SETTINGS, "shop", "api-0", 8080).protocol is Protocol.OPAQUE
    assert (
        resolve_inbound(state(), SETTINGS, "shop", "api-0", 5432).protocol is Protocol.OPAQUE
    )  # default list
    with pytest.raises(NotFound):
        resolve_inbound(st, SETTINGS, "shop", "ghost", 8080)


SERVER = """\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: Server
metadata: {name: api-http, namespace: shop}
spec: {podSelector: {matchLabels: {app: api}}, port: http, proxyProtocol: HTTP/1%s}
"""
MTLS = """\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: web-only, namespace: shop}
spec: {identityRefs: [{kind: ServiceAccount, name: web}]}
"""
NET = """\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: inside, namespace: shop}
spec: {networks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]}
"""


def authz(target_kind: str, target_name: str, *refs: tuple[str, str]) -> str:
    items = ", ".join(f"{{kind: {k}, name: {n}}}" for k, n in refs)
    return f"""\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: allow-{target_name}-{len(refs)}, namespace: shop}}
spec:
  targetRef: {{group: policy.trustmesh.io, kind: {target_kind}, name: {target_name}}}
  requiredAuthenticationRefs: [{items}]
"""


def test_server_without_authorization_denies_everything() -> None:
    p = resolve_inbound(state(SERVER % ""), SETTINGS, "shop", "api-0", 8080)
    assert (p.server.kind, p.server.name, p.protocol) == ("Server", "api-http", Protocol.HTTP1)
    assert not p.permits("10.0.0.1", True, WEB_ID)
    # Ports the server does not select keep the default policy.
    assert (
        resolve_inbound(state(SERVER % ""), SETTINGS, "shop", "api-0", 9090).server.kind
        == "default"
    )


def test_server_access_policy_applies_a_default() -> None:
    p = resolve_inbound(
        state(SERVER % ", accessPolicy: all-authenticated"), SETTINGS, "shop", "api-0", 8080
    )
    assert p.permits("1.2.3.4", True, OTHER_ID) and not p.permits("1.2.3.4", False, None)


def test_mesh_tls_authentication_by_service_account() -> None:
    st = state(
        SERVER % "" + MTLS + authz("Server", "api-http", ("MeshTLSAuthentication", "web-only"))
    )
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    assert p.permits("203.0.113.9", True, WEB_ID)
    assert not p.permits("203.0.113.9", True, OTHER_ID)
    assert not p.permits("203.0.113.9", False, None)


def test_identity_and_network_must_both_match() -> None:
    st = state(
        SERVER % ""
        + MTLS
        + NET
        + authz(
            "Server",
            "api-http",
            ("MeshTLSAuthentication", "web-only"),
            ("NetworkAuthentication", "inside"),
        )
    )
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    assert p.permits("10.1.0.1", True, WEB_ID)
    assert not p.permits("10.9.0.1", True, WEB_ID)  # excepted range
    assert not p.permits("192.168.0.1", True, WEB_ID)
    assert not p.permits("10.1.0.1", True, OTHER_ID)


def test_network_only_is_unauthenticated_and_namespace_target_applies() -> None:
    st = state(SERVER % "" + NET + authz("Namespace", "shop", ("NetworkAuthentication", "inside")))
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    assert p.permits("10.2.2.2", False, None) and not p.permits("172.16.0.1", False, None)


def test_wildcard_identities_and_missing_refs() -> None:
    wildcard = """\
---
apiVersion: policy.trustmesh.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: ns-other, namespace: shop}
spec: {identities: ["*.other.serviceaccount.identity.trustmesh.cluster.local"]}
"""
    st = state(
        SERVER % "" + wildcard + authz("Server", "api-http", ("MeshTLSAuthentication", "ns-other"))
    )
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    assert p.permits("1.1.1.1", True, OTHER_ID) and not p.permits("1.1.1.1", True, WEB_ID)
    # A policy naming an authentication that does not exist authorizes nothing.
    st = state(SERVER % "" + authz("Server", "api-http", ("MeshTLSAuthentication", "missing")))
    assert resolve_inbound(st, SETTINGS, "shop", "api-0", 8080).authorizations == ()


def test_http_route_authorizations_attach_to_the_route() -> None:
    route = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin, namespace: shop}
spec:
  parentRefs: [{group: policy.trustmesh.io, kind: Server, name: api-http}]
  rules: [{matches: [{path: {type: PathPrefix, value: /admin}}]}]
"""
    st = state(
        SERVER % ""
        + MTLS
        + route
        + authz("HTTPRoute", "admin", ("MeshTLSAuthentication", "web-only"))
    )
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    (r,) = p.routes
    assert r.ref.name == "admin" and r.matches[0].path.value == "/admin"
    assert r.authorizations[0].permits("1.1.1.1", True, WEB_ID)
    assert p.authorizations == ()
