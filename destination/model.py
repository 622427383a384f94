"""Endpoint discovery values shared by the destination service and the proxy's client.

An :class:`EndpointSet` is what a proxy knows about one service authority at one moment: every
endpoint with the identity it must present and how to speak to it. Sets are immutable; the
service turns two consecutive sets into :class:`Change` values (Linkerd's add/remove/no-endpoints
updates) with :func:`diff`, and the client rebuilds sets from changes with :func:`apply`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_WEIGHT = 10_000  # Linkerd's per-endpoint weight

H2 = "h2"
OPAQUE = "opaque"
_HINTS = (None, H2, OPAQUE)

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: Mapping[str, str] | Iterable[tuple[str, str]]) -> Labels:
    """A canonical (sorted) tuple of label pairs from a mapping or pairs."""
    pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
    out = tuple(sorted((str(k), str(v)) for k, v in pairs))
    return out


def _check_port(name: str, port: int, *, allow_zero: bool = False) -> None:
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{name} {port} is outside 1..65535")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a service, with what a client must know to connect to it."""

    address: str
    port: int
    weight: int = DEFAULT_WEIGHT
    identity: str | None = None  # DNS-like identity the peer must present; None: not meshed
    server_name: str | None = None  # SNI to send; Linkerd sets it equal to the identity
    protocol_hint: str | None = None  # "h2", "opaque" or None (unknown: detect)
    opaque_inbound_port: int | None = None  # peer proxy's inbound port for header-framed traffic
    metric_labels: Labels = ()
    workload: str | None = None  # "<ns>/<name>" of the workload behind it, when known

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"endpoint address {self.address!r} is not an IP address") from None
        object.__setattr__(self, "address", str(ip))
        _check_port("endpoint port", self.port)
        if not isinstance(self.weight, int) or not 0 <= self.weight <= 0xFFFFFFFF:
            raise ValueError(f"endpoint weight {self.weight!r} must be an int in 0..2^32-1")
        if self.protocol_hint not in _HINTS:
            raise ValueError(f"protocol hint {self.protocol_hint!r} is not one of h2, opaque")
        if self.opaque_inbound_port is not None:
            _check_port("opaque inbound port", self.opaque_inbound_port)
        if self.server_name is not None and self.identity is None:
            raise ValueError("an endpoint with a TLS server name must also have an identity")

    @property
    def key(self) -> tuple[str, int]:
        """The (address, port) pair that identifies this endpoint within a set."""
        return (self.address, self.port)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metric_labels)


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """Every endpoint of one authority. ``exists`` is False when the service is unknown."""

    authority: str
    endpoints: tuple[Endpoint, ...] = ()
    exists: bool = True
    metric_labels: Labels = ()
    _by_key: dict[tuple[str, int], Endpoint] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not isinstance(self.endpoints, tuple):
            raise TypeError("EndpointSet.endpoints must be a tuple")
        ordered = tuple(sorted(self.endpoints, key=lambda e: (e.address, e.port)))
        object.__setattr__(self, "endpoints", ordered)
        index = {e.key: e for e in ordered}
        if len(index) != len(ordered):
            raise ValueError(f"{self.authority}: two endpoints share the same address and port")
        if not self.exists and ordered:
            raise ValueError(f"{self.authority}: a service that does not exist has no endpoints")
        object.__setattr__(self, "_by_key", index)

    def get(self, address: str, port: int) -> Endpoint | None:
        return self._by_key.get((address, port))

    def __len__(self) -> int:
        return len(self.endpoints)


@dataclass(frozen=True, slots=True)
class Add:
    """New or changed endpoints (an add replaces an endpoint with the same address and port)."""

    endpoints: tuple[Endpoint, ...]
    metric_labels: Labels = ()


@dataclass(frozen=True, slots=True)
class Remove:
    """Endpoints that went away, by (address, port)."""

    keys: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class NoEndpoints:
    """The service has no endpoints (``exists``) or is unknown (not ``exists``)."""

    exists: bool


Change = Add | Remove | NoEndpoints


def diff(old: EndpointSet | None, new: EndpointSet) -> tuple[Change, ...]:
    """The changes that turn ``old`` (None: nothing sent yet) into ``new``.

    Follows Linkerd's contract: the first answer is an ``add`` or ``no_endpoints``; an emptied set
    is a ``remove`` (plus ``no_endpoints{exists: false}`` when the service itself disappeared).
    """
    if old is None:
        if new.endpoints:
            return (Add(new.endpoints, new.metric_labels),)
        return (NoEndpoints(exists=new.exists),)
    changes: list[Change] = []
    gone = tuple(e.key for e in old.endpoints if new.get(*e.key) is None)
    if gone:
        changes.append(Remove(gone))
    fresh = tuple(e for e in new.endpoints if old.get(*e.key) != e)
    if fresh or (new.metric_labels != old.metric_labels and new.endpoints):
        changes.append(Add(fresh or new.endpoints, new.metric_labels))
    if old.exists != new.exists and not new.endpoints:
        changes.append(NoEndpoints(exists=new.exists))
    return tuple(changes)


def apply(current: EndpointSet, change: Change) -> EndpointSet:
    """The set after ``change`` (the client side of :func:`diff`)."""
    if isinstance(change, Add):
        merged = dict(current._by_key)
        merged.update((e.key, e) for e in change.endpoints)
        return EndpointSet(
            current.authority,
            tuple(merged.values()),
            True,
            change.metric_labels or current.metric_labels,
        )
    if isinstance(change, Remove):
        keep = tuple(e for e in current.endpoints if e.key not in set(change.keys))
        return EndpointSet(current.authority, keep, current.exists, current.metric_labels)
    if isinstance(change, NoEndpoints):
        return EndpointSet(current.authority, (), change.exists, current.metric_labels)
    raise TypeError(f"not an endpoint change: {type(change).__name__}")


@dataclass(frozen=True, slots=True)
class TrustBundleSnapshot:
    """The mesh's trust anchors as served: PEM bytes, a stable digest, per-anchor fingerprints."""

    pem: bytes
    digest: str
    fingerprints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pem, bytes) or b"-----BEGIN CERTIFICATE-----" not in self.pem:
            raise ValueError("trust bundle PEM must be bytes holding at least one certificate")
        if not isinstance(self.digest, str) or len(self.digest) != 64:
            raise ValueError(f"trust bundle digest {self.digest!r} is not a SHA-256 hex digest")
