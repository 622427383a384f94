"""The cluster as the destination service sees it: immutable resources and one state snapshot.

Both sources produce the same values: the mesh file parses Kubernetes-style YAML documents and the
Kubernetes source parses API objects, both through :mod:`destination.parsing`. A
:class:`ClusterState` is a complete, consistent snapshot; resolvers read it and never mutate it.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from destination.model import Labels
from destination.policy import Network, Protocol
from pki.names import DEFAULT_CONTROL_PLANE_NAMESPACE, DEFAULT_TRUST_DOMAIN

DEFAULT_POLICIES = (
    "all-unauthenticated",
    "all-authenticated",
    "cluster-unauthenticated",
    "cluster-authenticated",
    "deny",
    "audit",
)
# Linkerd's chart defaults (proxy.opaquePorts, clusterNetworks).
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
DEFAULT_CLUSTER_NETWORKS = (
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fd00::/8",
)
DEFAULT_INBOUND_PROXY_PORT = 4143


def check_default_policy(value: str) -> str:
    if value not in DEFAULT_POLICIES:
        raise ValueError(
            f"default inbound policy {value!r} is not one of {', '.join(DEFAULT_POLICIES)}"
        )
    return value


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Mesh-wide settings: from the command line, overridden by a mesh file's MeshConfig."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NAMESPACE
    cluster_domain: str = "cluster.local"
    default_inbound_policy: str = "all-unauthenticated"
    cluster_networks: tuple[Network, ...] = tuple(
        Network.parse(n) for n in DEFAULT_CLUSTER_NETWORKS
    )
    default_opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    detect_timeout: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        check_default_policy(self.default_inbound_policy)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The optional ``kind: MeshConfig`` document of a mesh file (None fields: keep settings)."""

    default_inbound_policy: str | None = None
    cluster_networks: tuple[Network, ...] | None = None
    default_opaque_ports: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector (``matchLabels`` and ``matchExpressions``)."""

    match_labels: Labels = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str
    labels: Labels = ()
    annotations: Labels = ()

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str | None
    port: int


@dataclass(frozen=True, slots=True)
class Workload:
    """A Pod, or its embedded stand-in. ``inbound_proxy_port`` None: not meshed."""

    meta: Meta
    service_account: str
    address: str
    inbound_proxy_port: int | None = DEFAULT_INBOUND_PROXY_PORT
    ports: tuple[ContainerPort, ...] = ()
    opaque_ports: frozenset[int] | None = None  # None: the mesh default list applies
    skip_inbound_ports: frozenset[int] = frozenset()
    default_inbound_policy: str | None = None
    ready: bool = True

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.address)

    def port_named(self, name: str) -> int | None:
        for p in self.ports:
            if p.name == name:
                return p.port
        return None


@dataclass(frozen=True, slots=True)
class RouteRetry:
    """Gateway API ``rules[].retry`` (or the retry.linkerd.io annotations)."""

    codes: tuple[tuple[int, int], ...] | None = None
    attempts: int | None = None
    backoff: timedelta | None = None
    timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class RouteDefaults:
    """Retry and timeout annotations (``retry.linkerd.io/*``, ``timeout.linkerd.io/*``) of an
    HTTPRoute or Service; they override the route's own fields, as in Linkerd."""

    retry: RouteRetry | None = None
    request_timeout: timedelta | None = None
    response_timeout: timedelta | None = None
    idle_timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str | None = None
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    ports: tuple[ServicePort, ...]
    selector: Labels | None = None  # None: endpoints come from EndpointSlices only
    opaque_ports: frozenset[int] | None = None
    defaults: RouteDefaults = RouteDefaults()

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    workload: str | None = None  # name of the Pod/Workload in the slice's namespace
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    meta: Meta
    service: str
    ports: tuple[ContainerPort, ...]  # name -> port, as EndpointSlice ports
    endpoints: tuple[SliceEndpoint, ...]


@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: str
    name: str
    group: str = ""
    namespace: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Server:
    meta: Meta
    selector: LabelSelector
    port: int | str
    protocol: Protocol = Protocol.DETECT
    access_policy: str = "deny"


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    target: TargetRef
    required: tuple[TargetRef, ...]


@dataclass(frozen=True, slots=True)
class MeshTLSAuthentication:
    meta: Meta
    identities: tuple[str, ...] = ()
    identity_refs: tuple[TargetRef, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkAuthentication:
    meta: Meta
    networks: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    port: int | None
    weight: int = 1
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    matches: tuple = ()  # tuple[policy.HttpMatch, ...]
    backends: tuple[BackendRef, ...] = ()
    request_timeout: timedelta | None = None
    backend_request_timeout: timedelta | None = None
    retry: RouteRetry | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    meta: Meta
    parents: tuple[TargetRef, ...]
    rules: tuple[HTTPRouteRule, ...]
    hostnames: tuple[str, ...] = ()
    group: str = "gateway.networking.k8s.io"
    defaults: RouteDefaults = RouteDefaults()


Resource = (
    Workload
    | Service
    | EndpointSlice
    | Server
    | AuthorizationPolicy
    | MeshTLSAuthentication
    | NetworkAuthentication
    | HTTPRoute
    | MeshConfig
)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """One consistent snapshot of every resource, with lookup indexes built once."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    servers: tuple[Server, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    mesh_tls: tuple[MeshTLSAuthentication, ...] = ()
    network_authentications: tuple[NetworkAuthentication, ...] = ()
    http_routes: tuple[HTTPRoute, ...] = ()
    config: MeshConfig = MeshConfig()
    _index: dict[str, dict] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        idx: dict[str, dict] = {
            "workload": {w.meta.key: w for w in self.workloads},
            "service": {s.meta.key: s for s in self.services},
            "mesh_tls": {m.meta.key: m for m in self.mesh_tls},
            "network": {n.meta.key: n for n in self.network_authentications},
        }
        slices: dict[tuple[str, str], list[EndpointSlice]] = defaultdict(list)
        for s in self.slices:
            slices[(s.meta.namespace, s.service)].append(s)
        idx["slices"] = {k: tuple(v) for k, v in slices.items()}
        object.__setattr__(self, "_index", idx)

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self._index["workload"].get((namespace, name))

    def service(self, namespace: str, name: str) -> Service | None:
        return self._index["service"].get((namespace, name))

    def slices_of(self, namespace: str, service: str) -> tuple[EndpointSlice, ...]:
        return self._index["slices"].get((namespace, service), ())

    def mesh_tls_authentication(self, namespace: str, name: str) -> MeshTLSAuthentication | None:
        return self._index["mesh_tls"].get((namespace, name))

    def network_authentication(self, namespace: str, name: str) -> NetworkAuthentication | None:
        return self._index["network"].get((namespace, name))

    def settings(self, base: MeshSettings) -> MeshSettings:
        """``base`` with this state's MeshConfig overrides applied."""
        from dataclasses import replace

        c = self.config
        return replace(
            base,
            default_inbound_policy=c.default_inbound_policy or base.default_inbound_policy,
            cluster_networks=c.cluster_networks
            if c.cluster_networks is not None
            else base.cluster_networks,
            default_opaque_ports=(
                c.default_opaque_ports
                if c.default_opaque_ports is not None
                else base.default_opaque_ports
            ),
        )
