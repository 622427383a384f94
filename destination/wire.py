"""Model values to their protobuf messages (``protos/destination.proto``, ``protos/policy.proto``),
as the service sends them. The client reads them back with :mod:`destination.decode`; a round trip
returns an equal value, which the tests check."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from destination.model import Add, Change, Endpoint, Remove, TrustBundleSnapshot
from destination.policy import (
    AuthKind,
    Authorization,
    HttpMatch,
    InboundPolicy,
    OutboundPolicy,
    Protocol,
    Ref,
    Retry,
    RouteRule,
)
from protos import destination_pb2 as dpb
from protos import policy_pb2 as ppb

# --- addresses ------------------------------------------------------------------------------


def tcp_address(address: str, port: int) -> dpb.TcpAddress:
    ip = ipaddress.ip_address(address)
    msg = dpb.TcpAddress(port=port)
    if ip.version == 4:
        msg.ip.ipv4 = int(ip)
    else:
        value = int(ip)
        msg.ip.ipv6.first = value >> 64
        msg.ip.ipv6.last = value & 0xFFFF_FFFF_FFFF_FFFF
    return msg


# --- destination ----------------------------------------------------------------------------


def endpoint_to_proto(e: Endpoint) -> dpb.WeightedAddr:
    msg = dpb.WeightedAddr(addr=tcp_address(e.address, e.port), weight=e.weight)
    msg.metric_labels.update(dict(e.metric_labels))
    if e.identity is not None:
        msg.tls_identity.dns_like_identity.name = e.identity
        if e.server_name is not None:
            msg.tls_identity.server_name.name = e.server_name
    if e.protocol_hint == "h2":
        msg.protocol_hint.h2.SetInParent()
    elif e.protocol_hint == "opaque":
        msg.protocol_hint.opaque.SetInParent()
    if e.opaque_inbound_port is not None:
        msg.protocol_hint.opaque_transport.inbound_port = e.opaque_inbound_port
    if e.workload is not None:
        ns, _, name = e.workload.partition("/")
        msg.resource_ref.resource.CopyFrom(dpb.Resource(kind="Pod", name=name, namespace=ns))
    return msg


def update_to_proto(change: Change) -> dpb.Update:
    if isinstance(change, Add):
        add = dpb.WeightedAddrSet(addrs=[endpoint_to_proto(e) for e in change.endpoints])
        add.metric_labels.update(dict(change.metric_labels))
        return dpb.Update(add=add)
    if isinstance(change, Remove):
        return dpb.Update(remove=dpb.AddrSet(addrs=[tcp_address(a, p) for a, p in change.keys]))
    return dpb.Update(no_endpoints=dpb.NoEndpoints(exists=change.exists))


# --- shared policy pieces -------------------------------------------------------------------

_PROTOCOLS = {
    Protocol.DETECT: ppb.DETECT,
    Protocol.OPAQUE: ppb.OPAQUE,
    Protocol.HTTP1: ppb.HTTP1,
    Protocol.HTTP2: ppb.HTTP2,
    Protocol.GRPC: ppb.GRPC,
    Protocol.TLS: ppb.TLS,
}


def _dur(td: timedelta | None) -> Duration | None:
    if td is None:
        return None
    d = Duration()
    d.FromTimedelta(td)
    return d


def _ref(r: Ref | None) -> ppb.ResourceRef | None:
    return (
        None
        if r is None
        else ppb.ResourceRef(group=r.group, kind=r.kind, name=r.name, namespace=r.namespace)
    )


def _match(m: HttpMatch) -> ppb.HttpMatch:
    out = ppb.HttpMatch(method=m.method or "")
    if m.path is not None:
        out.path.type, out.path.value = m.path.type, m.path.value
    out.headers.extend(
        ppb.HttpMatch.Header(type=h.type, name=h.name, value=h.value) for h in m.headers
    )
    out.query_params.extend(
        ppb.HttpMatch.Header(type=q.type, name=q.name, value=q.value) for q in m.query_params
    )
    return out


def _authz(a: Authorization) -> ppb.Authorization:
    msg = ppb.Authorization(
        ref=_ref(a.ref),
        networks=[
            ppb.Network(cidr=str(n.cidr), **{"except": [str(e) for e in n.exceptions]})
            for n in a.networks
        ],
    )
    kind = a.authentication.kind
    if kind is AuthKind.UNAUTHENTICATED:
        msg.authentication.unauthenticated.SetInParent()
    elif kind is AuthKind.TLS:
        msg.authentication.tls_unauthenticated.SetInParent()
    else:
        msg.authentication.identities.patterns.extend(a.authentication.patterns)
    return msg


# --- inbound --------------------------------------------------------------------------------


def inbound_to_proto(p: InboundPolicy) -> ppb.InboundPolicy:
    return ppb.InboundPolicy(
        namespace=p.namespace,
        workload=p.workload,
        port=p.port,
        server=_ref(p.server),
        protocol=_PROTOCOLS[p.protocol],
        detect_timeout=_dur(p.detect_timeout),
        authorizations=[_authz(a) for a in p.authorizations],
        routes=[
            ppb.InboundRoute(
                ref=_ref(r.ref),
                matches=[_match(m) for m in r.matches],
                authorizations=[_authz(a) for a in r.authorizations],
            )
            for r in p.routes
        ],
        audit=p.audit,
    )


# --- outbound -------------------------------------------------------------------------------


def _retry(r: Retry) -> ppb.Retry:
    return ppb.Retry(
        max_retries=r.max_retries,
        status_ranges=[ppb.StatusRange(start=a, end=b) for a, b in r.status_ranges],
        timeout=_dur(r.timeout),
        min_backoff=_dur(r.min_backoff),
        max_backoff=_dur(r.max_backoff),
        jitter_ratio=r.jitter_ratio,
        max_request_bytes=r.max_request_bytes,
    )


def _rule(r: RouteRule) -> ppb.RouteRule:
    return ppb.RouteRule(
        matches=[_match(m) for m in r.matches],
        backends=[
            ppb.Backend(ref=_ref(b.ref), authority=b.authority, weight=b.weight) for b in r.backends
        ],
        timeouts=ppb.Timeouts(
            request=_dur(r.timeouts.request),
            response=_dur(r.timeouts.response),
            idle=_dur(r.timeouts.idle),
        ),
        retry=_retry(r.retry) if r.retry is not None else None,
    )


def outbound_to_proto(p: OutboundPolicy) -> ppb.OutboundPolicy:
    b = p.balancer
    return ppb.OutboundPolicy(
        authority=p.authority,
        parent=_ref(p.parent),
        protocol=_PROTOCOLS[p.protocol],
        detect_timeout=_dur(p.detect_timeout),
        routes=[
            ppb.OutboundRoute(
                ref=_ref(r.ref), hostnames=list(r.hostnames), rules=[_rule(x) for x in r.rules]
            )
            for r in p.routes
        ],
        balancer=ppb.Balancer(
            default_rtt=_dur(b.default_rtt),
            decay=_dur(b.decay),
            queue_capacity=b.queue_capacity,
            failfast_timeout=_dur(b.failfast_timeout),
        ),
    )


# --- trust bundle ---------------------------------------------------------------------------


def bundle_to_proto(b: TrustBundleSnapshot) -> ppb.TrustBundle:
    return ppb.TrustBundle(pem=b.pem, digest=b.digest, fingerprints=list(b.fingerprints))
