"""The proxy's settings vocabulary: listen addresses, control-plane targets, the key-exchange
policy and the timeouts' defaults.

Free of the data plane's imports (TLS, HTTP parsers, the event loop), so ``trustmesh proxy run``
checks a sidecar's flags without loading what the sidecar's own process then loads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pki.names import split_host_port
from proxy.errors import ConfigError

# A client that says nothing for this many seconds is taken as opaque TCP (server-speaks-first).
DETECT_TIMEOUT = 10.0
# A client that starts a request head and does not finish it within this many seconds gets
# 408 (slowloris): each stalled head would otherwise hold a connection and its buffer forever.
HEAD_TIMEOUT = 30.0
# On SIGTERM the proxy stops accepting, ends each client connection once its request in
# progress is answered, and waits this long for the rest (opaque streams) before cutting them.
SHUTDOWN_GRACE = 10.0


class KexPolicy(enum.Enum):
    """Which key exchanges a mesh connection may use."""

    HYBRID_REQUIRED = "hybrid-required"
    HYBRID_PREFERRED = "hybrid-preferred"


@dataclass(frozen=True, slots=True)
class Listen:
    """A listen address; port 0 picks a free port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"listen port must be between 0 and 65535, got {self.port!r}")


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts."""
    parts = split_host_port(target)
    if parts is None or not parts[0]:
        raise ValueError(f"{target!r} is not HOST:PORT")
    return parts


@dataclass(frozen=True, slots=True)
class Target:
    """Where a channel connects: TCP addresses tried in order, or a Unix socket."""

    addresses: tuple[tuple[str, int], ...] = ()
    path: str | None = None  # a Unix socket; an abstract one starts with NUL

    def __post_init__(self) -> None:
        if bool(self.addresses) == (self.path is not None):
            raise ValueError("a target is TCP addresses or a Unix socket path")


def parse_target(target: str) -> Target:
    """``HOST:PORT``, or a gRPC target with its scheme: ``dns:[//authority/]HOST:PORT``,
    ``ipv4:ADDR:PORT[,ADDR:PORT...]``, ``ipv6:[ADDR]:PORT[,...]``, ``unix:PATH``,
    ``unix:///ABSOLUTE``, ``unix-abstract:NAME``. Raises ValueError naming what is wrong."""
    scheme, sep, rest = target.partition(":")
    if not sep or scheme not in _SCHEMES:
        return Target(addresses=(split_target(target),))
    try:
        if scheme == "dns":
            if rest.startswith("//"):  # dns://[resolver]/host:port: the resolver is the system's
                rest = rest[2:].partition("/")[2]
            return Target(addresses=(split_target(rest),))
        if scheme in ("ipv4", "ipv6"):
            return Target(addresses=tuple(split_target(a) for a in rest.split(",")))
        if scheme == "unix":
            path = rest[2:] if rest.startswith("//") else rest
            if not path:
                raise ValueError("no socket path")
            return Target(path=path)
        if scheme == "unix-abstract":
            return Target(path="\0" + rest)
        raise ValueError("vsock targets are not supported")
    except ValueError as e:
        raise ValueError(f"{target!r}: {e}") from None


_SCHEMES = frozenset(("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock"))
