"""Inbound authorization, pure: (policy, port, client[, request]) -> decision.

A port covered by a :class:`Server` admits a client when one of the server's authorizations
matches it (client network within one of its CIDRs, and an identity matching one of its
patterns, or unauthenticated clients allowed). Any other port falls back to the default
policy, named as Linkerd names them. The identity patterns are exact names, ``*`` or
``*.suffix`` (``pki.names.identity_matches``).

A Server with HTTPRoutes attached decides per HTTP request (:func:`authorize_request`): the
request goes to the most specific matching route, and that route's authorizations are added to
the server's (Linkerd's semantics); a request no route matches is refused as not found.
Specificity follows the Gateway API (exact path, then the longer path, then a method, then
more header and query matches); a regular-expression path ranks between exact and prefix
paths, as in Linkerd.

Unlike Linkerd, which matches the path as sent, a request is authorized only if it would be
under every reading an application may give it (:func:`path_readings`: percent-decoded,
dot segments removed, slashes merged, ...; the first or the last of a repeated header or
query parameter): otherwise ``/%61dmin`` or ``/x/../admin`` would be judged by the routes of
some other path and then served as ``/admin``.

A connection that outlives the decision that admitted it (an opaque TCP relay, an HTTP
connection switched to another protocol by ``Upgrade``) is decided again when the policy
changes (:func:`reauthorize`), by the same rules: the upgrade request's
:class:`RequestFacts` stand for the request.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl

from destination.policy import HttpMatch
from pki.names import identity_matches
from proxy.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALL_NETWORKS: tuple[Network, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


class DefaultPolicy(enum.Enum):
    """Linkerd's default inbound policies."""

    ALL_UNAUTHENTICATED = "all-unauthenticated"
    ALL_AUTHENTICATED = "all-authenticated"
    CLUSTER_UNAUTHENTICATED = "cluster-unauthenticated"
    CLUSTER_AUTHENTICATED = "cluster-authenticated"
    DENY = "deny"


def parse_networks(values: tuple[str, ...] | list[str]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as e:
        raise ConfigError(f"invalid network in {list(values)!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class Authorization:
    """Admits clients from ``networks`` that are unauthenticated (if allowed) or match ``identities``."""

    name: str
    identities: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ALL_NETWORKS
    unauthenticated: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("authorization name must not be empty")
        if not isinstance(self.identities, tuple) or not isinstance(self.networks, tuple):
            raise TypeError(f"authorization {self.name}: identities and networks must be tuples")
        if not self.unauthenticated and not self.identities:
            raise ConfigError(
                f"authorization {self.name} admits nobody: give identities or unauthenticated=True"
            )

    def admits(
        self, identity: str | None, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> bool:
        if not any(ip in net for net in self.networks):
            return False
        if self.unauthenticated:
            return True
        return identity is not None and any(identity_matches(p, identity) for p in self.identities)


_EVERY_REQUEST = (HttpMatch(),)


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """An HTTPRoute attached to a Server: the requests it matches (none listed: every
    request) and the authorizations it adds to the server's for them."""

    name: str
    matches: tuple[HttpMatch, ...] = ()
    authorizations: tuple[Authorization, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("route name must not be empty")
        if not isinstance(self.matches, tuple) or not isinstance(self.authorizations, tuple):
            raise TypeError(f"route {self.name}: matches and authorizations must be tuples")


class _Matched(Protocol):
    @property
    def matches(self) -> tuple[HttpMatch, ...]: ...


M = TypeVar("M", bound=_Matched)


def most_specific(
    candidates: Iterable[M], method: str, path: str, headers: dict[str, str], query: dict[str, str]
) -> M | None:
    """Of ``candidates`` (each with ``matches``; none listed: every request), the one with the
    most specific match for the request (Gateway API precedence, see match_rank), the first
    listed on a tie; None when none matches."""
    best: M | None = None
    best_rank: tuple[int, int, bool, int, int] | None = None
    for candidate in candidates:
        for match in candidate.matches or _EVERY_REQUEST:
            if not match.matches(method, path, headers, query):
                continue
            rank = match_rank(match)
            if best_rank is None or rank > best_rank:
                best, best_rank = candidate, rank
    return best


def match_rank(match: HttpMatch) -> tuple[int, int, bool, int, int]:
    """Sort key of a match's specificity; the greater key wins."""
    path = match.path
    if path is None:  # as PathPrefix "/"
        kind, length = 0, 1
    elif path.type == "Exact":
        kind, length = 2, len(path.value)
    elif path.type == "RegularExpression":
        kind, length = 1, len(path.value)
    else:
        kind, length = 0, len(path.value)
    return kind, length, match.method is not None, len(match.headers), len(match.query_params)


@dataclass(frozen=True, slots=True)
class Server:
    """A port of the local workload with its own authorizations (Linkerd's Server resource)
    and the HTTPRoutes attached to it."""

    name: str
    port: int
    authorizations: tuple[Authorization, ...] = ()
    routes: tuple[HttpRoute, ...] = ()
    # True when a route matches on request headers (the caller must collect them); derived
    # once here because it is read for every request.
    needs_headers: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("server name must not be empty")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"server {self.name}: port must be between 1 and 65535")
        if not isinstance(self.routes, tuple):
            raise TypeError(f"server {self.name}: routes must be a tuple")
        needs = any(m.headers for r in self.routes for m in r.matches)
        object.__setattr__(self, "needs_headers", needs)

    def route_for(
        self, method: str, path: str, headers: dict[str, str], query: dict[str, str]
    ) -> HttpRoute | None:
        """The most specific route matching the request, or None (first listed on a tie).
        ``headers`` (lower-case names) and ``query`` are dicts, as HttpMatch takes them."""
        return most_specific(self.routes, method, path, headers, query)


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """The whole inbound policy of one proxy."""

    default: DefaultPolicy = DefaultPolicy.ALL_UNAUTHENTICATED
    servers: tuple[Server, ...] = ()
    cluster_networks: tuple[Network, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.default, DefaultPolicy):
            raise TypeError("default must be a DefaultPolicy")
        ports = [s.port for s in self.servers]
        if len(set(ports)) != len(ports):
            raise ConfigError("two servers cover the same port")
        if (
            self.default
            in (DefaultPolicy.CLUSTER_AUTHENTICATED, DefaultPolicy.CLUSTER_UNAUTHENTICATED)
            and not self.cluster_networks
        ):
            raise ConfigError(f"default policy {self.default.value} needs cluster_networks")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome; ``reason`` names why a denial happened (sent in ``l5d-proxy-error``).

    ``route`` is the HTTPRoute a request matched; ``no_route`` marks a request refused
    because no route of its server matches it (HTTP 404 rather than 403).
    """

    allowed: bool
    server: str
    authorization: str | None
    reason: str
    route: str | None = None
    no_route: bool = False


def _default_server(policy: InboundPolicy, port: int) -> Server:
    d = policy.default
    if d is DefaultPolicy.DENY:
        authz: tuple[Authorization, ...] = ()
    else:
        networks = ALL_NETWORKS if d.value.startswith("all-") else policy.cluster_networks
        unauth = d.value.endswith("-unauthenticated")
        authz = (Authorization(d.value, ("*",), networks, unauthenticated=unauth),)
    return Server(f"default:{d.value}", port, authz)


def server_for(policy: InboundPolicy, port: int) -> Server:
    """The Server covering ``port``, or the default policy's."""
    return next((s for s in policy.servers if s.port == port), None) or _default_server(
        policy, port
    )


def authorize(
    policy: InboundPolicy,
    port: int,
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> Decision:
    """Decide whether a client (``identity`` None when it is not mesh-authenticated) may
    connect: the server's own authorizations, whatever its routes."""
    server = server_for(policy, port)
    return _decide(server, server.authorizations, identity, ip, None)


def authorize_request(
    server: Server,
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    method: str,
    target: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> Decision:
    """Decide one HTTP request to ``server`` (request ``target`` = path and query; ``headers``
    a mapping or the request's (name, value) pairs in order). Without routes this is
    :func:`authorize`; with routes, the matched route's authorizations are added to the
    server's, and a request no route matches is refused. A request an application could read
    in several ways is allowed only if every reading is (the first refusal is returned)."""
    if not server.routes:
        return _decide(server, server.authorizations, identity, ip, None)
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    header_views = _views((k.lower(), v) for k, v in pairs)
    # Clients do not send a fragment, but a request may: most servers cut it off, some not.
    targets = (target, target.partition("#")[0]) if "#" in target else (target,)
    allowed: Decision | None = None
    for text in targets:
        path, _, query_text = text.partition("?")
        # Query values compare form-decoded (%2F and + as / and space).
        query_views = _views(parse_qsl(query_text, keep_blank_values=True)) if query_text else ({},)
        for reading in path_readings(path):
            for header_map in header_views:
                for query_map in query_views:
                    decision = _decide_route(
                        server, identity, ip, method, reading, header_map, query_map
                    )
                    if not decision.allowed:
                        return decision
                    allowed = allowed or decision
    assert allowed is not None
    return allowed


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What of an HTTP request its authorization depends on: method, target (path and
    query) and end-to-end headers in order. Kept for a connection that outlives its request
    (an upgraded one), to decide the request again under a changed policy."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not isinstance(self.target, str):
            raise TypeError("request facts: method and target must be str")
        if not isinstance(self.headers, tuple) or not all(
            isinstance(h, tuple) and len(h) == 2 for h in self.headers
        ):
            raise TypeError("request facts: headers must be a tuple of (name, value) tuples")
        if not self.method:
            raise ValueError("request facts: method must not be empty")


def reauthorize(
    policy: InboundPolicy,
    port: int,
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    request: RequestFacts | None,
) -> Decision:
    """Decide an open connection again under ``policy``: a TCP relay (``request`` None) as
    :func:`authorize` admitted it, an upgraded HTTP connection as :func:`authorize_request`
    admitted its upgrade request (the port's routes included)."""
    if request is None:
        return authorize(policy, port, identity, ip)
    server = server_for(policy, port)
    return authorize_request(server, identity, ip, request.method, request.target, request.headers)


def _decide_route(
    server: Server,
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    method: str,
    path: str,
    headers: dict[str, str],
    query: dict[str, str],
) -> Decision:
    route = server.route_for(method, path, headers, query)
    if route is None:
        return Decision(
            False,
            server.name,
            None,
            f"no HTTPRoute of server {server.name} matches {method} {path}",
            no_route=True,
        )
    return _decide(server, server.authorizations + route.authorizations, identity, ip, route.name)


def _views(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, str], ...]:
    """The first-value and last-value readings of repeated names (one when they agree):
    applications differ in which of a repeated header or query parameter they use."""
    first: dict[str, str] = {}
    last: dict[str, str] = {}
    for name, value in pairs:
        first.setdefault(name, value)
        last[name] = value
    return (first,) if first == last else (first, last)


# A path one of the rewrites below could change; any other has the one reading.
_AMBIGUOUS = re.compile(r"%|\\|//|;|/\.\.?(?:/|$)")
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeE]|5[fF]|7[eE])")
_SLASH_ESCAPE = re.compile(r"%(?:2[fF]|5[cC])")
_PARAMS = re.compile(r";[^/]*")
_SLASHES = re.compile(r"/{2,}")


def _remove_dots(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path."""
    if not path.startswith("/"):
        return path
    out: list[str] = []
    segments = path[1:].split("/")
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/.." is the directory "/"
    return "/" + "/".join(out)


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m.group()[1:], 16))


# Rewrites servers apply before routing, in the order they apply them; every subset counts.
_REWRITES: tuple[Callable[[str], str], ...] = (
    lambda p: _UNRESERVED_ESCAPE.sub(_unescape, p),  # equivalent by RFC 3986 6.2.2.2
    lambda p: _SLASH_ESCAPE.sub(_unescape, p),  # %2F and %5C, which some servers decode
    lambda p: p.replace("\\", "/"),
    lambda p: _PARAMS.sub("", p),  # servlet-style path parameters
    lambda p: _SLASHES.sub("/", p),
    _remove_dots,
    lambda p: _SLASHES.sub("/", p),  # after dot removal too: "/a//.." differs either way
)


def path_readings(path: str) -> tuple[str, ...]:
    """The paths an application may take ``path`` for, the path as sent first."""
    if not _AMBIGUOUS.search(path):
        return (path,)
    readings = {path: None}
    for rewrite in _REWRITES:
        for reading in tuple(readings):
            readings.setdefault(rewrite(reading))
    return tuple(readings)


def client_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address policy judges a client by: its socket peer, without an IPv6 zone, and an
    IPv4-mapped IPv6 address as the IPv4 address it is (a dual-stack socket reports IPv4
    clients so, and IPv4 networks must still hold for them)."""
    ip = ipaddress.ip_address(peer.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _decide(
    server: Server,
    authorizations: tuple[Authorization, ...],
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    route: str | None,
) -> Decision:
    for authz in authorizations:
        if authz.admits(identity, ip):
            return Decision(True, server.name, authz.name, "authorized", route)
    where = f"server {server.name}" + (f" route {route}" if route else "")
    if not authorizations:
        reason = f"{where} denies every client"
    elif identity is None:
        reason = f"unauthenticated client {ip} is not authorized on {where}"
    else:
        reason = f"client {identity} from {ip} is not authorized on {where}"
    return Decision(False, server.name, None, reason, route)


class PolicySource(Protocol):
    """The current inbound policy (the destination client's policy stream implements this)."""

    def current(self) -> InboundPolicy:
        """The policy to apply to new connections and requests."""


class StaticPolicy:
    def __init__(self, policy: InboundPolicy | None = None) -> None:
        self._policy = policy or InboundPolicy()

    def current(self) -> InboundPolicy:
        return self._policy

    def update(self, policy: InboundPolicy) -> None:
        self._policy = policy
