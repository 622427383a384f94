"""Resolved policy values: what a proxy enforces on an inbound port and how it routes outbound.

These are the answers of the policy streams (``protos/policy.proto``), shared by the service
(which computes them in :mod:`destination.inbound` / :mod:`destination.outbound`) and the proxy's
client. Authorization is decided by :meth:`Authorization.permits`, a pure function of the
client's address and identity, so the proxy and the tests use the same logic.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta

from pki.names import identity_matches

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(enum.Enum):
    """How a port's traffic is handled (Linkerd's proxyProtocol values)."""

    DETECT = "detect"
    OPAQUE = "opaque"
    HTTP1 = "HTTP/1"
    HTTP2 = "HTTP/2"
    GRPC = "gRPC"
    TLS = "TLS"

    @classmethod
    def parse(cls, value: str) -> Protocol:
        """Parse a Server ``proxyProtocol`` (``unknown`` means detect)."""
        if value in ("unknown", "detect"):
            return cls.DETECT
        for p in cls:
            if p.value == value:
                return p
        names = ", ".join(["unknown", *(p.value for p in cls if p is not cls.DETECT)])
        raise ValueError(f"protocol {value!r} is not one of {names}")


@dataclass(frozen=True, slots=True)
class Ref:
    """Where a policy element came from (``kind='default'`` for synthesized ones)."""

    kind: str
    name: str
    namespace: str = ""
    group: str = ""


@dataclass(frozen=True, slots=True)
class Network:
    """A CIDR clients may come from, minus exceptions."""

    cidr: IPNetwork
    exceptions: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.cidr, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise TypeError("Network.cidr must be an ipaddress network")

    @classmethod
    def parse(cls, cidr: str, exceptions: tuple[str, ...] = ()) -> Network:
        return cls(_net(cidr), tuple(_net(e) for e in exceptions))

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # what a dual-stack socket reports an IPv4 client as
        if address.version != self.cidr.version or address not in self.cidr:
            return False
        return not any(address.version == e.version and address in e for e in self.exceptions)


def _net(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR network such as 10.0.0.0/8") from None


ALL_NETWORKS = (Network.parse("0.0.0.0/0"), Network.parse("::/0"))


class AuthKind(enum.Enum):
    UNAUTHENTICATED = "unauthenticated"  # anything, TLS or not
    TLS = "tls-unauthenticated"  # mesh TLS required, any or no client identity
    IDENTITIES = "identities"  # mesh TLS with a client identity matching a pattern


@dataclass(frozen=True, slots=True)
class Authentication:
    kind: AuthKind
    patterns: tuple[str, ...] = ()  # exact identity, "*" or "*.<suffix>"

    def __post_init__(self) -> None:
        if self.kind is AuthKind.IDENTITIES and not self.patterns:
            raise ValueError("identity authentication needs at least one identity pattern")
        if self.kind is not AuthKind.IDENTITIES and self.patterns:
            raise ValueError(f"{self.kind.value} authentication takes no identity patterns")

    def permits(self, tls: bool, identity: str | None) -> bool:
        if self.kind is AuthKind.UNAUTHENTICATED:
            return True
        if self.kind is AuthKind.TLS:
            return tls
        return (
            tls
            and identity is not None
            and any(identity_matches(p, identity) for p in self.patterns)
        )


UNAUTHENTICATED = Authentication(AuthKind.UNAUTHENTICATED)
ANY_IDENTITY = Authentication(AuthKind.IDENTITIES, ("*",))


@dataclass(frozen=True, slots=True)
class Authorization:
    ref: Ref
    networks: tuple[Network, ...]
    authentication: Authentication

    def permits(self, address: str, tls: bool, identity: str | None) -> bool:
        """True when a client at ``address`` (with ``identity`` over mesh TLS) is allowed."""
        ip = ipaddress.ip_address(address)
        return any(n.contains(ip) for n in self.networks) and self.authentication.permits(
            tls, identity
        )


# --- HTTP matching (Gateway API semantics) ---------------------------------------------------

_PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
_VALUE_TYPES = ("Exact", "RegularExpression")


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str
    value: str

    def __post_init__(self) -> None:
        if self.type not in _PATH_TYPES:
            raise ValueError(
                f"path match type {self.type!r} is not one of {', '.join(_PATH_TYPES)}"
            )
        if self.type == "RegularExpression":
            _compile(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with '/'")

    def matches(self, path: str) -> bool:
        path = path.split("?", 1)[0]
        if self.type == "Exact":
            return path == self.value
        if self.type == "PathPrefix":
            prefix = self.value.rstrip("/")
            return path == prefix or path.startswith(prefix + "/") or not prefix
        return re.fullmatch(self.value, path) is not None


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query-parameter match."""

    name: str
    value: str
    type: str = "Exact"

    def __post_init__(self) -> None:
        if self.type not in _VALUE_TYPES:
            raise ValueError(f"match type {self.type!r} is not one of {', '.join(_VALUE_TYPES)}")
        if not self.name:
            raise ValueError("a header or query parameter match needs a name")
        if self.type == "RegularExpression":
            _compile(self.value)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.type == "Exact":
            return value == self.value
        return re.fullmatch(self.value, value) is not None


def _compile(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regular expression {pattern!r} is invalid: {e}") from None


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """Every set part must match; an empty match matches every request."""

    path: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    method: str | None = None
    query_params: tuple[ValueMatch, ...] = ()

    def matches(
        self, method: str, path: str, headers: dict[str, str], query: dict[str, str]
    ) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        lowered = {k.lower(): v for k, v in headers.items()}
        if not all(h.matches(lowered.get(h.name.lower())) for h in self.headers):
            return False
        return all(q.matches(query.get(q.name)) for q in self.query_params)


# --- inbound --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboundRoute:
    ref: Ref
    matches: tuple[HttpMatch, ...] = ()
    authorizations: tuple[Authorization, ...] = ()


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """The policy of one port of one workload. No authorizations means deny everything."""

    namespace: str
    workload: str
    port: int
    server: Ref
    protocol: Protocol
    authorizations: tuple[Authorization, ...] = ()
    routes: tuple[InboundRoute, ...] = ()
    detect_timeout: timedelta = timedelta(seconds=10)
    audit: bool = False

    def permits(self, address: str, tls: bool, identity: str | None) -> bool:
        """Connection-level decision (routes may add authorizations for matching requests)."""
        if self.audit:
            return True
        return any(a.permits(address, tls, identity) for a in self.authorizations)


# --- outbound -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    authority: str
    weight: int = 1
    ref: Ref | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, int) or self.weight < 0:
            raise ValueError(f"backend weight {self.weight!r} must be a non-negative int")


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: timedelta | None = None  # whole request including retries
    response: timedelta | None = None  # per attempt, until response headers
    idle: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    max_retries: int = 1
    status_ranges: tuple[tuple[int, int], ...] = ((500, 599),)
    timeout: timedelta | None = None
    min_backoff: timedelta = timedelta(milliseconds=25)
    max_backoff: timedelta = timedelta(milliseconds=250)
    jitter_ratio: float = 1.0
    max_request_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"retry limit {self.max_retries} must not be negative")
        for start, end in self.status_ranges:
            if not 100 <= start <= end <= 599:
                raise ValueError(f"retry status range {start}-{end} is not within 100..599")

    def retries_status(self, status: int) -> bool:
        return any(start <= status <= end for start, end in self.status_ranges)


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[HttpMatch, ...] = ()
    backends: tuple[Backend, ...] = ()
    timeouts: Timeouts = Timeouts()
    retry: Retry | None = None


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    ref: Ref
    rules: tuple[RouteRule, ...]
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Balancer:
    """Peak-EWMA power-of-two-choices with a bounded queue (Linkerd's defaults)."""

    default_rtt: timedelta = timedelta(milliseconds=30)
    decay: timedelta = timedelta(seconds=10)
    queue_capacity: int = 100
    failfast_timeout: timedelta = timedelta(seconds=3)


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """How to route traffic for one authority; the first rule whose match fits wins."""

    authority: str
    parent: Ref
    protocol: Protocol
    routes: tuple[OutboundRoute, ...]
    detect_timeout: timedelta = timedelta(seconds=10)
    balancer: Balancer = Balancer()

    def route_for(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> RouteRule | None:
        """The first rule whose matches accept the request (no matches: accepts all)."""
        h, q = headers or {}, query or {}
        for route in self.routes:
            for rule in route.rules:
                if not rule.matches or any(m.matches(method, path, h, q) for m in rule.matches):
                    return rule
        return None
