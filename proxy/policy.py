"""Inbound authorization, pure: (policy, port, client) -> decision.

A port covered by a :class:`Server` admits a client when one of the server's authorizations
matches it (client network within one of its CIDRs, and an identity matching one of its
patterns, or unauthenticated clients allowed). Any other port falls back to the default
policy, named as Linkerd names them. The identity patterns are exact names, ``*`` or
``*.suffix`` (``pki.names.identity_matches``).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(frozen=True, slots=True)
class Server:
    """A port of the local workload with its own authorizations (Linkerd's Server resource)."""

    name: str
    port: int
    authorizations: tuple[Authorization, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("server name must not be empty")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"server {self.name}: port must be between 1 and 65535")


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
    """The outcome; ``reason`` names why a denial happened (sent in ``l5d-proxy-error``)."""

    allowed: bool
    server: str
    authorization: str | None
    reason: str


def _default_server(policy: InboundPolicy, port: int) -> Server:
    d = policy.default
    if d is DefaultPolicy.DENY:
        authz: tuple[Authorization, ...] = ()
    else:
        networks = ALL_NETWORKS if d.value.startswith("all-") else policy.cluster_networks
        unauth = d.value.endswith("-unauthenticated")
        authz = (Authorization(d.value, ("*",), networks, unauthenticated=unauth),)
    return Server(f"default:{d.value}", port, authz)


def authorize(
    policy: InboundPolicy,
    port: int,
    identity: str | None,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> Decision:
    """Decide whether a client (``identity`` None when it is not mesh-authenticated) may connect."""
    server = next((s for s in policy.servers if s.port == port), None) or _default_server(
        policy, port
    )
    for authz in server.authorizations:
        if authz.admits(identity, ip):
            return Decision(True, server.name, authz.name, "authorized")
    if not server.authorizations:
        reason = f"server {server.name} denies every client"
    elif identity is None:
        reason = f"unauthenticated client {ip} is not authorized on server {server.name}"
    else:
        reason = f"client {identity} from {ip} is not authorized on server {server.name}"
    return Decision(False, server.name, None, reason)


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
