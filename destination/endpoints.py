"""Endpoint resolution: a service authority into the :class:`EndpointSet` proxies receive.

Follows Linkerd's destination controller: weight 10000; for meshed workloads the DNS-like
identity (also the TLS server name), the ``opaque`` hint for opaque ports and ``h2`` otherwise,
and ``opaque_transport`` pointing at the workload's inbound proxy port (Linkerd 2.18's
transport-header mode: all meshed traffic goes through the peer's proxy). Ports the workload
skips get neither identity nor hint. Pure functions of a :class:`ClusterState`.
"""

from __future__ import annotations

from destination.inbound import opaque_ports, servers_for
from destination.model import Endpoint, EndpointSet, labels_of
from destination.paths import Target
from destination.policy import Protocol
from destination.resources import ClusterState, MeshSettings, Service, ServicePort, Workload
from pki.names import Identity

OPAQUE_APP_PROTOCOLS = ("linkerd.io/opaque", "linkerd.io/tcp", "trustmesh.io/opaque")


def service_port_is_opaque(svc: Service, sp: ServicePort | None, port: int) -> bool:
    if svc.opaque_ports is not None and port in svc.opaque_ports:
        return True
    return sp is not None and sp.app_protocol in OPAQUE_APP_PROTOCOLS


def _endpoint(
    state: ClusterState,
    settings: MeshSettings,
    address: str,
    port: int,
    workload: Workload | None,
    service_opaque: bool,
) -> Endpoint:
    if (
        workload is None
        or workload.inbound_proxy_port is None
        or port in workload.skip_inbound_ports
    ):
        labels = {"pod": workload.meta.name} if workload else {}
        return Endpoint(
            address,
            port,
            metric_labels=labels_of(labels),
            workload=str(workload.meta) if workload else None,
        )
    ident = Identity(
        workload.service_account,
        workload.meta.namespace,
        settings.control_plane_namespace,
        settings.trust_domain,
    ).dns_name
    opaque = (
        service_opaque
        or port in opaque_ports(workload, settings)
        or any(s.protocol is Protocol.OPAQUE for s in servers_for(state, workload, port))
    )
    labels = {
        "pod": workload.meta.name,
        "serviceaccount": workload.service_account,
        "control_plane_ns": settings.control_plane_namespace,
    }
    return Endpoint(
        address,
        port,
        identity=ident,
        server_name=ident,
        protocol_hint="opaque" if opaque else "h2",
        opaque_inbound_port=workload.inbound_proxy_port,
        metric_labels=labels_of(labels),
        workload=str(workload.meta),
    )


def resolve_endpoints(state: ClusterState, base: MeshSettings, target: Target) -> EndpointSet:
    """The endpoints of ``target``; ``exists=False`` (and no endpoints) for unknown services."""
    svc = state.service(target.namespace, target.service)
    if svc is None:
        return EndpointSet(target.authority, (), exists=False)
    settings = state.settings(base)
    set_labels = labels_of({"service": svc.meta.name, "namespace": svc.meta.namespace})
    sp = svc.port(target.port)
    if sp is None:
        return EndpointSet(target.authority, (), True, set_labels)
    service_opaque = service_port_is_opaque(svc, sp, target.port)
    found: dict[tuple[str, int], Endpoint] = {}
    for slc in state.slices_of(target.namespace, target.service):
        number = next((p.port for p in slc.ports if p.name == sp.name), None)
        if number is None:
            continue
        for ep in slc.endpoints:
            if not ep.ready:
                continue
            if target.instance and target.instance not in (ep.hostname, ep.workload):
                continue
            workload = state.workload(target.namespace, ep.workload) if ep.workload else None
            for address in ep.addresses:
                e = _endpoint(state, settings, address, number, workload, service_opaque)
                found.setdefault(e.key, e)  # the same address in two slices is one endpoint
    return EndpointSet(target.authority, tuple(found.values()), True, set_labels)
