"""Model values from the destination and policy messages, as the client reads them.

The client decodes with :mod:`protos.lite` (the sidecar does not load protobuf); the functions
read fields, ``HasField`` and ``WhichOneof`` only, so they take protobuf's messages as well,
which is how the tests compare the two. The service's side, from model values to messages, is
:mod:`destination.wire`; a round trip through both returns an equal value.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

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
from protos.lite import enum_value

# A decoded message: protos.lite's, or protobuf's in the tests.
Message = Any

UPDATE = "io.linkerd.proxy.destination.Update"
INBOUND_POLICY = "trustmesh.policy.v1.InboundPolicy"
OUTBOUND_POLICY = "trustmesh.policy.v1.OutboundPolicy"
TRUST_BUNDLE = "trustmesh.policy.v1.TrustBundle"

PROTOCOL_ENUM = "trustmesh.policy.v1.Protocol"
# Wire number → model protocol; unknown numbers (a newer service) read as DETECT.
_PROTOCOLS_BACK = {enum_value(PROTOCOL_ENUM, p.name): p for p in Protocol}


def address_of(msg: Message) -> tuple[str, int]:
    which = msg.ip.WhichOneof("ip")
    if which == "ipv4":
        return str(ipaddress.IPv4Address(msg.ip.ipv4)), msg.port
    if which == "ipv6":
        return str(ipaddress.IPv6Address((msg.ip.ipv6.first << 64) | msg.ip.ipv6.last)), msg.port
    raise InvalidTarget("a TcpAddress without an IP address")


def endpoint_from_proto(msg: Message) -> Endpoint:
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


def update_from_proto(msg: Message) -> Change:
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


def _td(msg: Message, field: str) -> timedelta | None:
    return getattr(msg, field).ToTimedelta() if msg.HasField(field) else None


def _ref_back(m: Message) -> Ref:
    return Ref(m.kind, m.name, m.namespace, m.group)


def _match_back(m: Message) -> HttpMatch:
    return HttpMatch(
        PathMatch(m.path.type, m.path.value) if m.HasField("path") else None,
        tuple(ValueMatch(h.name, h.value, h.type) for h in m.headers),
        m.method or None,
        tuple(ValueMatch(q.name, q.value, q.type) for q in m.query_params),
    )


def _authz_back(m: Message) -> Authorization:
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


def inbound_from_proto(m: Message) -> InboundPolicy:
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


def _retry_back(m: Message) -> Retry:
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


def _rule_back(m: Message) -> RouteRule:
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


def outbound_from_proto(m: Message) -> OutboundPolicy:
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


def bundle_from_proto(m: Message) -> TrustBundleSnapshot:
    return TrustBundleSnapshot(m.pem, m.digest, tuple(m.fingerprints))
