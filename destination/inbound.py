"""Inbound policy resolution: which clients may reach a workload's port, and as what protocol.

Linkerd's semantics: a port selected by a Server is governed by that Server (its
``accessPolicy``, default ``deny``, plus every AuthorizationPolicy targeting the Server or its
namespace, and its HTTPRoutes); any other port falls back to the workload's default policy
(annotation, else the mesh default). An AuthorizationPolicy whose authentication refs do not all
exist authorizes nothing, as in Linkerd. Pure functions of a :class:`ClusterState`.
"""

from __future__ import annotations

from destination.errors import NotFound
from destination.policy import (
    ALL_NETWORKS,
    ANY_IDENTITY,
    UNAUTHENTICATED,
    Authentication,
    AuthKind,
    Authorization,
    HttpMatch,
    InboundPolicy,
    InboundRoute,
    Network,
    Protocol,
    Ref,
)
from destination.resources import (
    AuthorizationPolicy,
    ClusterState,
    MeshSettings,
    Server,
    TargetRef,
    Workload,
)
from pki.names import Identity, namespace_wildcard

POLICY_GROUP = "policy.trustmesh.io"


def default_authorizations(
    policy: str, settings: MeshSettings
) -> tuple[tuple[Authorization, ...], bool]:
    """The authorizations a default policy name stands for, and whether it is ``audit``."""
    ref = Ref("default", policy)
    cluster = settings.cluster_networks
    table: dict[str, tuple[tuple[Network, ...], Authentication] | None] = {
        "all-unauthenticated": (ALL_NETWORKS, UNAUTHENTICATED),
        "all-authenticated": (ALL_NETWORKS, ANY_IDENTITY),
        "cluster-unauthenticated": (cluster, UNAUTHENTICATED),
        "cluster-authenticated": (cluster, ANY_IDENTITY),
        "audit": (ALL_NETWORKS, UNAUTHENTICATED),
        "deny": None,
    }
    entry = table[policy]
    if entry is None:
        return (), False
    return (Authorization(ref, entry[0], entry[1]),), policy == "audit"


def opaque_ports(workload: Workload, settings: MeshSettings) -> frozenset[int]:
    if workload.opaque_ports is not None:
        return workload.opaque_ports
    return settings.default_opaque_ports


def _port_matches(server: Server, workload: Workload, port: int) -> bool:
    if isinstance(server.port, int):
        return server.port == port
    return workload.port_named(server.port) == port


def servers_for(state: ClusterState, workload: Workload, port: int) -> list[Server]:
    """Servers selecting ``port`` of ``workload`` (overlaps are invalid; sorted by name)."""
    labels = dict(workload.meta.labels)
    return sorted(
        (
            s
            for s in state.servers
            if s.meta.namespace == workload.meta.namespace
            and s.selector.matches(labels)
            and _port_matches(s, workload, port)
        ),
        key=lambda s: s.meta.name,
    )


def _targets(policy: AuthorizationPolicy, kind: str, name: str) -> bool:
    t = policy.target
    return (
        t.kind == kind
        and t.name == name
        and t.group in ("", POLICY_GROUP, "policy.linkerd.io", "gateway.networking.k8s.io", "core")
    )


def authorization_from(
    state: ClusterState, policy: AuthorizationPolicy, settings: MeshSettings
) -> Authorization | None:
    """The authorization an AuthorizationPolicy grants; None while a ref is missing."""
    ns = policy.meta.namespace
    networks: tuple[Network, ...] = ALL_NETWORKS
    patterns: list[str] = []
    identity_required = False
    for ref in policy.required:
        ref_ns = ref.namespace or ns
        if ref.kind == "NetworkAuthentication":
            net = state.network_authentication(ref_ns, ref.name)
            if net is None:
                return None
            networks = net.networks
        elif ref.kind == "MeshTLSAuthentication":
            mtls = state.mesh_tls_authentication(ref_ns, ref.name)
            if mtls is None:
                return None
            identity_required = True
            patterns.extend(mtls.identities)
            patterns.extend(_expand(r, mtls.meta.namespace, settings) for r in mtls.identity_refs)
        elif ref.kind == "ServiceAccount":
            identity_required = True
            patterns.append(_expand(ref, ns, settings))
    authn = (
        Authentication(AuthKind.IDENTITIES, tuple(patterns))
        if identity_required
        else UNAUTHENTICATED
    )
    return Authorization(
        Ref("AuthorizationPolicy", policy.meta.name, ns, POLICY_GROUP), networks, authn
    )


def _expand(ref: TargetRef, default_ns: str, settings: MeshSettings) -> str:
    cp, td = settings.control_plane_namespace, settings.trust_domain
    if ref.kind == "Namespace":
        return namespace_wildcard(ref.name, cp, td)
    return Identity(ref.name, ref.namespace or default_ns, cp, td).dns_name


def _policies_for(
    state: ClusterState, settings: MeshSettings, ns: str, kind: str, name: str
) -> tuple[Authorization, ...]:
    out = []
    for p in state.authorization_policies:
        if p.meta.namespace != ns or not _targets(p, kind, name):
            continue
        authz = authorization_from(state, p, settings)
        if authz is not None:
            out.append(authz)
    return tuple(out)


def resolve_inbound(
    state: ClusterState, base: MeshSettings, namespace: str, name: str, port: int
) -> InboundPolicy:
    """The policy of ``port`` on workload ``namespace/name``; NotFound for unknown workloads."""
    workload = state.workload(namespace, name)
    if workload is None:
        raise NotFound(f"workload {namespace}/{name} is not known to the destination service")
    settings = state.settings(base)
    servers = servers_for(state, workload, port)
    if not servers:
        policy = workload.default_inbound_policy or settings.default_inbound_policy
        authz, audit = default_authorizations(policy, settings)
        protocol = Protocol.OPAQUE if port in opaque_ports(workload, settings) else Protocol.DETECT
        return InboundPolicy(
            namespace,
            name,
            port,
            Ref("default", policy),
            protocol,
            authz,
            (),
            settings.detect_timeout,
            audit,
        )
    server = servers[0]
    authz = _policies_for(state, settings, namespace, "Server", server.meta.name)
    authz += _policies_for(state, settings, namespace, "Namespace", namespace)
    audit = False
    if server.access_policy != "deny":
        extra, audit = default_authorizations(server.access_policy, settings)
        authz += extra
    routes = tuple(
        InboundRoute(
            Ref("HTTPRoute", r.meta.name, namespace, r.group),
            # A rule without matches matches every request (Gateway API: PathPrefix /).
            tuple(m for rule in r.rules for m in (rule.matches or (HttpMatch(),))),
            _policies_for(state, settings, namespace, "HTTPRoute", r.meta.name),
        )
        for r in sorted(state.http_routes, key=lambda r: r.meta.name)
        if r.meta.namespace == namespace
        and any(
            p.kind == "Server"
            and p.name == server.meta.name
            and (p.namespace or namespace) == namespace
            for p in r.parents
        )
    )
    return InboundPolicy(
        namespace,
        name,
        port,
        Ref("Server", server.meta.name, namespace, POLICY_GROUP),
        server.protocol,
        authz,
        routes,
        settings.detect_timeout,
        audit,
    )
