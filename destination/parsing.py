"""Kubernetes-style documents (mesh-file YAML or API objects) into :mod:`destination.resources`.

One parser serves both sources, so the mesh file and Kubernetes mean the same thing. Every
error is an :class:`InvalidResource` naming the field (``spec.ports[0].targetPort``); the caller
adds which document it was (:func:`describe`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from destination.documents import (
    Doc,
    default_policy_annotation,
    guard,
    meta_ports,
    parse_meta,
    parse_ports_list,
)
from destination.errors import InvalidResource
from destination.model import labels_of
from destination.policy import Network
from destination.policy_parsing import (
    parse_authorization_policy,
    parse_http_route,
    parse_mesh_tls,
    parse_network_authentication,
    parse_route_defaults,
    parse_server,
)
from destination.resources import (
    DEFAULT_INBOUND_PROXY_PORT,
    ContainerPort,
    EndpointSlice,
    MeshConfig,
    Resource,
    Service,
    ServicePort,
    SliceEndpoint,
    Workload,
    check_default_policy,
)
from pki.names import check_label

TRUSTMESH_GROUP = "trustmesh.io"
POLICY_GROUPS = ("policy.trustmesh.io", "policy.linkerd.io")
ROUTE_GROUPS = ("gateway.networking.k8s.io", "policy.linkerd.io")
# Pod labels that mark a meshed workload (TrustMesh's, and Linkerd's for mixed meshes).
MESHED_LABELS = ("trustmesh.io/control-plane-ns", "linkerd.io/control-plane-ns")
PROXY_CONTAINERS = ("trustmesh-proxy", "linkerd-proxy")


# --- workloads, services, endpoints ---------------------------------------------------------


def parse_workload(obj: Doc) -> Workload:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    ports = tuple(
        ContainerPort(p.text("name"), p.number("port", required=True, lo=1))
        for p in spec.docs("ports")
    )
    names = {p.name: p.port for p in ports if p.name}
    return guard(
        spec,
        "address",
        lambda: Workload(
            meta,
            guard(
                spec,
                "serviceAccount",
                lambda: check_label("service account", spec.text("serviceAccount", required=True)),
            ),
            spec.text("address", required=True),
            spec.number("inboundProxyPort", lo=1),
            ports,
            meta_ports(meta, "opaque-ports", names),
            meta_ports(meta, "skip-inbound-ports", names) or frozenset(),
            default_policy_annotation(meta),
            spec.flag("ready", True),
        ),
    )


def parse_pod(obj: Doc) -> Workload | None:
    """A Pod as a Workload; None while it has no IP (pending) or has finished."""
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    status = obj.child("status")
    assert spec is not None
    ip = status.text("podIP") if status else None
    phase = status.text("phase") if status else None
    if ip is None or phase in ("Succeeded", "Failed"):
        return None
    ports: list[ContainerPort] = []
    inbound: int | None = None
    meshed = any(meta.label(k) for k in MESHED_LABELS)
    for c in spec.docs("containers"):
        for p in c.docs("ports"):
            port = ContainerPort(p.text("name"), p.number("containerPort", required=True, lo=1))
            if c.text("name") in PROXY_CONTAINERS:
                if port.name in PROXY_CONTAINERS or inbound is None:
                    inbound = port.port
            else:
                ports.append(port)
    if meshed and inbound is None:
        inbound = DEFAULT_INBOUND_PROXY_PORT
    names = {p.name: p.port for p in ports if p.name}
    return guard(
        obj,
        "status.podIP",
        lambda: Workload(
            meta,
            spec.text("serviceAccountName", "default"),
            ip,
            inbound if meshed else None,
            tuple(ports),
            meta_ports(meta, "opaque-ports", names),
            meta_ports(meta, "skip-inbound-ports", names) or frozenset(),
            default_policy_annotation(meta),
        ),
    )


def parse_service(obj: Doc) -> Service:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    ports = []
    for p in spec.docs("ports", required=True):
        number = p.number("port", required=True, lo=1)
        target = p.port_or_name("targetPort", required=False)
        ports.append(ServicePort(number, target or number, p.text("name"), p.text("appProtocol")))
    if len({p.port for p in ports}) != len(ports):
        raise spec.fail("ports", "two ports share the same port number")
    names = {p.name: p.port for p in ports if p.name}
    selector = spec.raw("selector")
    return Service(
        meta,
        tuple(ports),
        labels_of(spec.string_map("selector")) if selector is not None else None,
        meta_ports(meta, "opaque-ports", names),
        parse_route_defaults(meta),
    )


def parse_endpoint_slice(obj: Doc) -> EndpointSlice:
    meta = parse_meta(obj)
    service = meta.label("kubernetes.io/service-name")
    if service is None:
        raise InvalidResource("is required", field="metadata.labels[kubernetes.io/service-name]")
    ports = tuple(
        ContainerPort(p.text("name"), p.number("port", required=True, lo=1))
        for p in obj.docs("ports")
    )
    endpoints = []
    for e in obj.docs("endpoints"):
        conditions = e.child("conditions")
        ready = conditions.raw("ready") if conditions else None
        ref = e.child("targetRef")
        workload = (
            ref.text("name") if ref and ref.text("kind", "Pod") in ("Pod", "Workload") else None
        )
        endpoints.append(
            SliceEndpoint(e.strings("addresses"), ready is not False, workload, e.text("hostname"))
        )
    return EndpointSlice(meta, service, ports, tuple(endpoints))


def parse_mesh_config(obj: Doc) -> MeshConfig:
    spec = obj.child("spec") or Doc({}, "spec")
    policy = spec.text("defaultInboundPolicy")
    if policy is not None:
        guard(spec, "defaultInboundPolicy", lambda: check_default_policy(policy))
    networks = None
    if spec.raw("clusterNetworks") is not None:
        networks = tuple(
            guard(
                spec,
                "clusterNetworks",
                lambda: tuple(Network.parse(n) for n in spec.strings("clusterNetworks")),
            )
        )
    opaque = None
    if spec.raw("defaultOpaquePorts") is not None:
        opaque = parse_ports_list(
            ",".join(str(p) for p in spec.sequence("defaultOpaquePorts")),
            {},
            "spec.defaultOpaquePorts",
        )
    return MeshConfig(policy, networks, opaque)


# --- dispatch -------------------------------------------------------------------------------

_CORE: dict[tuple[str, str], Callable[[Doc], Resource | None]] = {
    (TRUSTMESH_GROUP, "Workload"): parse_workload,
    (TRUSTMESH_GROUP, "MeshConfig"): parse_mesh_config,
    ("", "Service"): parse_service,
    ("", "Pod"): parse_pod,
    ("discovery.k8s.io", "EndpointSlice"): parse_endpoint_slice,
}
_POLICY: dict[str, Callable[[Doc], Resource]] = {
    "Server": parse_server,
    "AuthorizationPolicy": parse_authorization_policy,
    "MeshTLSAuthentication": parse_mesh_tls,
    "NetworkAuthentication": parse_network_authentication,
}


def parse_resource(data: Any) -> Resource | None:
    """Parse one object by ``apiVersion``/``kind``; None for objects that carry nothing (a
    pending Pod). Raises :class:`InvalidResource` for unknown kinds and bad fields."""
    obj = Doc(data)
    api_version = obj.text("apiVersion", required=True)
    kind = obj.text("kind", required=True)
    group = api_version.rpartition("/")[0]
    if (group, kind) in _CORE:
        return _CORE[(group, kind)](obj)
    if group in POLICY_GROUPS and kind in _POLICY:
        return _POLICY[kind](obj)
    if group in ROUTE_GROUPS and kind == "HTTPRoute":
        return parse_http_route(obj, group)
    raise InvalidResource(
        f"{api_version} {kind} is not a kind the destination service knows", field="kind"
    )


def describe(data: Any) -> str:
    """``Service default/web`` for error messages (best effort on malformed input)."""
    if not isinstance(data, dict):
        return "document"
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    name = meta.get("name", "?")
    ns = meta.get("namespace", "default")
    return f"{data.get('kind', '?')} {ns}/{name}"
