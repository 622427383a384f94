"""Where outbound traffic goes: services, their endpoints and the identity each must present.

The outbound side asks a :class:`RouteSource` for the service behind an HTTP authority or an
upstream listener; the destination client implements the same interface from its stream, and
:class:`StaticRoutes` serves a fixed table (tests, benchmarks, ``--routes`` files). A changed
service is a new (frozen) value, so callers notice changes by identity comparison.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from destination.policy import HttpMatch
from proxy.errors import ConfigError
from proxy.policy import most_specific


class ServiceProtocol(enum.Enum):
    """How to carry a service's traffic (Linkerd's protocol hints)."""

    HTTP1 = "http"
    OPAQUE = "opaque"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend: the application's address, and for a meshed one its proxy's identity/port.

    A meshed endpoint (``identity`` set) is reached through mesh TLS on ``proxy_port`` at
    ``host``, with a transport header naming ``port``; an unmeshed one is dialled directly.
    """

    host: str
    port: int
    identity: str | None = None
    proxy_port: int | None = None
    # An endpoint keys the connection pool and the balancer's load table on every request:
    # the hash is computed once (the generated __hash__ builds a tuple per call).
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("endpoint host must be a non-empty string")
        _check_port("endpoint port", self.port)
        if (self.identity is None) != (self.proxy_port is None):
            raise ConfigError(
                f"endpoint {self.host}:{self.port} needs both identity and proxy_port, or neither"
            )
        if self.proxy_port is not None:
            _check_port("endpoint proxy_port", self.proxy_port)
        key = (self.host, self.port, self.identity, self.proxy_port)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    @property
    def meshed(self) -> bool:
        return self.identity is not None

    @property
    def label(self) -> str:
        """How logs name the endpoint: the address dialled, and the identity expected there."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        dialled = f"{host}:{self.proxy_port or self.port}"
        return f"{dialled} ({self.identity})" if self.identity else dialled


@dataclass(frozen=True, slots=True)
class RouteTimeouts:
    """An outbound route's timeouts, in seconds (None: no limit). ``request``: from when the
    proxy starts forwarding the request until its response is complete, retries included;
    ``response``: for each try, until the response's head arrives."""

    request: float | None = None
    response: float | None = None

    def __post_init__(self) -> None:
        for name in ("request", "response"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(
                    f"the {name} timeout must be a positive number of seconds, got {value!r}"
                )
            object.__setattr__(self, name, float(value))

    @property
    def shortest(self) -> float | None:
        """The first of the two to expire (None when neither is set)."""
        values = [v for v in (self.request, self.response) if v is not None]
        return min(values) if values else None


@dataclass(frozen=True, slots=True)
class RouteRetry:
    """An outbound route's retries (Linkerd's ``retry.linkerd.io`` semantics): a request whose
    answer has a status in ``status_ranges``, or whose try outlives ``timeout`` (seconds, per
    try) before its answer's head, is sent again, at most ``max_retries`` times, after a
    backoff from ``min_backoff`` doubling to ``max_backoff`` (seconds, ``jitter`` as a ratio
    added at random). Only a request whose whole body came and is at most
    ``max_request_bytes`` can be sent again (it is kept for that)."""

    max_retries: int = 1
    status_ranges: tuple[tuple[int, int], ...] = ((500, 599),)
    timeout: float | None = None
    min_backoff: float = 0.025
    max_backoff: float = 0.25
    jitter: float = 1.0
    max_request_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ConfigError(f"the retry limit must be an int, got {self.max_retries!r}")
        if not 0 <= self.max_retries <= 10:
            raise ConfigError(f"the retry limit must be between 0 and 10, got {self.max_retries}")
        for start, end in self.status_ranges:
            if not 100 <= start <= end <= 599:
                raise ConfigError(f"retry status range {start}-{end} is not within 100..599")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError("the per-try timeout must be a positive number of seconds")
        if not 0 <= self.min_backoff <= self.max_backoff or not 0 <= self.jitter <= 10:
            raise ConfigError("retry backoff: need 0 <= min <= max and a jitter ratio of 0..10")

    def retries_status(self, status: int) -> bool:
        return any(start <= status <= end for start, end in self.status_ranges)

    def backoff(self, retry: int, sample: float) -> float:
        """Seconds before retry number ``retry`` (1 for the first), ``sample`` in [0, 1)."""
        base = min(self.max_backoff, self.min_backoff * 2 ** min(retry - 1, 16))
        return min(self.max_backoff, base * (1.0 + self.jitter * sample))


@dataclass(frozen=True, slots=True)
class OutboundRule:
    """One rule of an outbound route (an HTTPRoute rule, or a service's default route): the
    requests it matches (none listed: every request), their timeouts and retries. ``route``
    names where it comes from, for messages."""

    route: str
    matches: tuple[HttpMatch, ...] = ()
    timeouts: RouteTimeouts = RouteTimeouts()
    retry: RouteRetry | None = None

    @property
    def limits(self) -> bool:
        """Whether the rule does anything to its requests (a timeout or retries)."""
        return self.timeouts.shortest is not None or self.retry is not None

    @property
    def try_timeout(self) -> tuple[float, str] | None:
        """The timeout of each try and its name: the response timeout or the retry's own
        per-try timeout, whichever is shorter (None when neither is set)."""
        candidates = []
        if self.timeouts.response is not None:
            candidates.append((self.timeouts.response, "response"))
        if self.retry is not None and self.retry.timeout is not None:
            candidates.append((self.retry.timeout, "per-try"))
        return min(candidates) if candidates else None


@dataclass(frozen=True, slots=True)
class Service:
    """A named set of endpoints reached by authority (``name`` and ``authorities``), and the
    outbound rules its HTTP requests are matched to (only when some rule has a timeout or
    retries: else none, and requests are not matched at all)."""

    name: str
    endpoints: tuple[Endpoint, ...]
    protocol: ServiceProtocol = ServiceProtocol.HTTP1
    authorities: tuple[str, ...] = field(default=())
    rules: tuple[OutboundRule, ...] = ()
    # Whether a rule matches on request headers or query parameters: derived once here,
    # read for every request matched.
    needs_headers: bool = field(default=False, init=False, compare=False)
    needs_query: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("service name must not be empty")
        if not isinstance(self.endpoints, tuple) or not all(
            isinstance(e, Endpoint) for e in self.endpoints
        ):
            raise TypeError(f"service {self.name}: endpoints must be a tuple of Endpoint")
        if not isinstance(self.protocol, ServiceProtocol):
            raise TypeError(f"service {self.name}: protocol must be a ServiceProtocol")
        if not isinstance(self.rules, tuple) or not all(
            isinstance(r, OutboundRule) for r in self.rules
        ):
            raise TypeError(f"service {self.name}: rules must be a tuple of OutboundRule")
        matches = [m for r in self.rules for m in r.matches]
        object.__setattr__(self, "needs_headers", any(m.headers for m in matches))
        object.__setattr__(self, "needs_query", any(m.query_params for m in matches))

    def rule_for(
        self, method: str, path: str, headers: dict[str, str], query: dict[str, str]
    ) -> OutboundRule | None:
        """The rule whose match is the most specific for the request (Gateway API precedence:
        the first listed on a tie), or None. ``headers`` have lower-case names."""
        return most_specific(self.rules, method, path, headers, query)


class RouteSource(Protocol):
    """Looks services up for the outbound side (the destination client implements this)."""

    def by_authority(self, authority: str) -> Service | None:
        """The service an HTTP ``Host``/authority names, or None."""

    def by_name(self, name: str) -> Service | None:
        """The service called ``name`` (upstream listeners are configured by name)."""


class StaticRoutes:
    """A fixed route table; :meth:`replace` swaps it whole (e.g. when a file changes)."""

    def __init__(self, services: tuple[Service, ...] = ()) -> None:
        self._names: dict[str, Service] = {}
        self._authorities: dict[str, Service] = {}
        self.replace(services)

    def replace(self, services: tuple[Service, ...]) -> None:
        names: dict[str, Service] = {}
        authorities: dict[str, Service] = {}
        for svc in services:
            if svc.name in names:
                raise ConfigError(f"service {svc.name} is defined twice")
            names[svc.name] = svc
            for authority in (svc.name, *svc.authorities):
                authorities[authority.lower()] = svc
        self._names, self._authorities = names, authorities

    def by_authority(self, authority: str) -> Service | None:
        svc = self._authorities.get(authority)
        if svc is None:
            authority = authority.lower()
            svc = self._authorities.get(authority)
            if svc is None and ":" in authority:  # "web:80" -> "web"
                svc = self._authorities.get(authority.rsplit(":", 1)[0])
        return svc

    def by_name(self, name: str) -> Service | None:
        return self._names.get(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaticRoutes:
        """Build from ``{"services": [{"name", "protocol", "authorities", "endpoints": [...],
        "timeouts": {"request", "response"}}]}`` (timeouts in seconds, for every request)."""
        services = []
        for raw in data.get("services", ()):
            try:
                endpoints = tuple(
                    Endpoint(e["host"], int(e["port"]), e.get("identity"), e.get("proxy_port"))
                    for e in raw.get("endpoints", ())
                )
                timeouts = raw.get("timeouts")
                if timeouts is not None and not isinstance(timeouts, Mapping):
                    raise ConfigError(
                        f"service {raw['name']}: timeouts must be a mapping with request "
                        f"and/or response (seconds), got {timeouts!r}"
                    )
                rules: tuple[OutboundRule, ...] = ()
                if timeouts:
                    unknown = set(timeouts) - {"request", "response"}
                    if unknown:
                        raise ConfigError(
                            f"service {raw['name']}: unknown timeouts {sorted(unknown)} "
                            "(request and response are known)"
                        )
                    rules = (
                        OutboundRule(
                            "config",
                            (),
                            RouteTimeouts(timeouts.get("request"), timeouts.get("response")),
                        ),
                    )
                services.append(
                    Service(
                        raw["name"],
                        endpoints,
                        ServiceProtocol(raw.get("protocol", "http")),
                        tuple(raw.get("authorities", ())),
                        rules,
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"route table entry {raw!r} is invalid: {e}") from None
        return cls(tuple(services))


def _check_port(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConfigError(f"{name} must be an int between 1 and 65535, got {value!r}")
