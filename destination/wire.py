"""Model values to and from their protobuf messages (``protos/destination.proto``,
``protos/policy.proto``). The service encodes with the ``*_to_proto`` functions and the client
decodes with ``*_from_proto``; a round trip returns an equal value, which the tests check."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from destination.errors import InvalidTarget
from destination.model import Add, Change, Endpoint, NoEndpoints, Remove, TrustBundleSnapshot
from destination.model import labels_of as _labels
from destination.policy import (
    Authentication,
    AuthKind,
    Authorization,
    Backend,
    Balancer,
    HttpMatch,
    InboundPolicy,
    InboundRoute,
    Network,
    OutboundPolicy,
    OutboundRoute,
    PathMatch,
    Protocol,
    Ref,
    Retry,
    RouteRule,
    Timeouts,
    ValueMatch,
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


def address_of(msg: dpb.TcpAddress) -> tuple[str, int]:
    which = msg.ip.WhichOneof("ip")
    if which == "ipv4":
        return str(ipaddress.IPv4Address(msg.ip.ipv4)), msg.port
    if which == "ipv6":
        return str(ipaddress.IPv6Address((msg.ip.ipv6.first << 64) | msg.ip.ipv6.last)), msg.port
    raise InvalidTarget("a TcpAddress without an IP address")


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


def endpoint_from_proto(msg: dpb.WeightedAddr) -> Endpoint:
    address, port = address_of(msg.addr)
    identity = server_name = None
    if msg.HasField("tls_identity"):
        strategy = msg.tls_identity.WhichOneof("strategy")
        if strategy == "dns_like_identity":
            identity = msg.tls_identity.dns_like_identity.name
        elif strategy == "uri_like_identity":
            identity = msg.tls_identity.uri_like_identity.uri
        if identity is not None and msg.tls_identity.HasField("server_name"):
            server_name = msg.tls_identity.server_name.name
    hint = inbound = None
    if msg.HasField("protocol_hint"):
        hint = msg.protocol_hint.WhichOneof("protocol")
        if msg.protocol_hint.HasField("opaque_transport"):
            inbound = msg.protocol_hint.opaque_transport.inbound_port
    workload = None
    if msg.resource_ref.WhichOneof("kind") == "resource":
        r = msg.resource_ref.resource
        workload = f"{r.namespace}/{r.name}"
    return Endpoint(
        address,
        port,
        msg.weight,
        identity,
        server_name,
        hint,
        inbound,
        _labels(msg.metric_labels),
        workload,
    )


def update_to_proto(change: Change) -> dpb.Update:
    if isinstance(change, Add):
        add = dpb.WeightedAddrSet(addrs=[endpoint_to_proto(e) for e in change.endpoints])
        add.metric_labels.update(dict(change.metric_labels))
        return dpb.Update(add=add)
    if isinstance(change, Remove):
        return dpb.Update(remove=dpb.AddrSet(addrs=[tcp_address(a, p) for a, p in change.keys]))
    return dpb.Update(no_endpoints=dpb.NoEndpoints(exists=change.exists))


def update_from_proto(msg: dpb.Update) -> Change:
    which = msg.WhichOneof("update")
    if which == "add":
        return Add(
            tuple(endpoint_from_proto(a) for a in msg.add.addrs), _labels(msg.add.metric_labels)
        )
    if which == "remove":
        return Remove(tuple(address_of(a) for a in msg.remove.addrs))
    if which == "no_endpoints":
        return NoEndpoints(msg.no_endpoints.exists)
    raise InvalidTarget("an Update message with no update set")


# --- shared policy pieces -------------------------------------------------------------------

_PROTOCOLS = {
    Protocol.DETECT: ppb.DETECT,
    Protocol.OPAQUE: ppb.OPAQUE,
    Protocol.HTTP1: ppb.HTTP1,
    Protocol.HTTP2: ppb.HTTP2,
    Protocol.GRPC: ppb.GRPC,
    Protocol.TLS: ppb.TLS,
}
_PROTOCOLS_BACK = {v: k for k, v in _PROTOCOLS.items()}


def _dur(td: timedelta | None) -> Duration | None:
    if td is None:
        return None
    d = Duration()
    d.FromTimedelta(td)
    return d


def _td(msg: object, field: str) -> timedelta | None:
    return getattr(msg, field).ToTimedelta() if msg.HasField(field) else None  # type: ignore[attr-defined]


def _ref(r: Ref | None) -> ppb.ResourceRef | None:
    return (
        None
        if r is None
        else ppb.ResourceRef(group=r.group, kind=r.kind, name=r.name, namespace=r.namespace)
    )


def _ref_back(m: ppb.ResourceRef) -> Ref:
    return Ref(m.kind, m.name, m.namespace, m.group)


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


def _match_back(m: ppb.HttpMatch) -> HttpMatch:
    return HttpMatch(
        PathMatch(m.path.type, m.path.value) if m.HasField("path") else None,
        tuple(ValueMatch(h.name, h.value, h.type) for h in m.headers),
        m.method or None,
        tuple(ValueMatch(q.name, q.value, q.type) for q in m.query_params),
    )


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


def _authz_back(m: ppb.Authorization) -> Authorization:
    which = m.authentication.WhichOneof("kind")
    if which == "identities":
        authn = Authentication(AuthKind.IDENTITIES, tuple(m.authentication.identities.patterns))
    elif which == "tls_unauthenticated":
        authn = Authentication(AuthKind.TLS)
    elif which == "unauthenticated":
        authn = Authentication(AuthKind.UNAUTHENTICATED)
    else:  # a kind this side does not know (or none): it must authorize nobody
        return Authorization(_ref_back(m.ref), (), Authentication(AuthKind.TLS))
    nets = tuple(Network.parse(n.cidr, tuple(getattr(n, "except"))) for n in m.networks)
    return Authorization(_ref_back(m.ref), nets, authn)


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


def inbound_from_proto(m: ppb.InboundPolicy) -> InboundPolicy:
    return InboundPolicy(
        m.namespace,
        m.workload,
        m.port,
        _ref_back(m.server),
        _PROTOCOLS_BACK.get(m.protocol, Protocol.DETECT),
        tuple(_authz_back(a) for a in m.authorizations),
        tuple(
            InboundRoute(
                _ref_back(r.ref),
                tuple(_match_back(x) for x in r.matches),
                tuple(_authz_back(a) for a in r.authorizations),
            )
            for r in m.routes
        ),
        _td(m, "detect_timeout") or timedelta(seconds=10),
        m.audit,
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


def _retry_back(m: ppb.Retry) -> Retry:
    base = Retry()
    return Retry(
        m.max_retries,
        tuple((s.start, s.end) for s in m.status_ranges),
        _td(m, "timeout"),
        _td(m, "min_backoff") or base.min_backoff,
        _td(m, "max_backoff") or base.max_backoff,
        round(m.jitter_ratio, 6),
        m.max_request_bytes,
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


def _rule_back(m: ppb.RouteRule) -> RouteRule:
    t = m.timeouts
    return RouteRule(
        tuple(_match_back(x) for x in m.matches),
        tuple(
            Backend(b.authority, b.weight, _ref_back(b.ref) if b.HasField("ref") else None)
            for b in m.backends
        ),
        Timeouts(_td(t, "request"), _td(t, "response"), _td(t, "idle")),
        _retry_back(m.retry) if m.HasField("retry") else None,
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


def outbound_from_proto(m: ppb.OutboundPolicy) -> OutboundPolicy:
    base = Balancer()
    b = m.balancer
    return OutboundPolicy(
        m.authority,
        _ref_back(m.parent),
        _PROTOCOLS_BACK.get(m.protocol, Protocol.DETECT),
        tuple(
            OutboundRoute(
                _ref_back(r.ref), tuple(_rule_back(x) for x in r.rules), tuple(r.hostnames)
            )
            for r in m.routes
        ),
        _td(m, "detect_timeout") or timedelta(seconds=10),
        Balancer(
            _td(b, "default_rtt") or base.default_rtt,
            _td(b, "decay") or base.decay,
            b.queue_capacity or base.queue_capacity,
            _td(b, "failfast_timeout") or base.failfast_timeout,
        ),
    )


# --- trust bundle ---------------------------------------------------------------------------


def bundle_to_proto(b: TrustBundleSnapshot) -> ppb.TrustBundle:
    return ppb.TrustBundle(pem=b.pem, digest=b.digest, fingerprints=list(b.fingerprints))


def bundle_from_proto(m: ppb.TrustBundle) -> TrustBundleSnapshot:
    return TrustBundleSnapshot(m.pem, m.digest, tuple(m.fingerprints))
