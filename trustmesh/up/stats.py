"""What a proxy's admin ``/metrics`` says, as values: identity, certificate expiry, negotiated
TLS groups, HTTP requests with success rate and latency quantiles, TCP connections.

Parsing and the quantile estimate are pure (Prometheus text in, values out); :func:`scrape` is
the one function that does I/O.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

HYBRID_GROUP = "X25519MLKEM768"


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: linear interpolation within the bucket holding rank ``q``.

    ``buckets`` are (upper bound, cumulative count) pairs, ``+Inf`` last; None without samples.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the highest finite bound is all that can be said
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True, slots=True)
class HttpStats:
    """HTTP traffic of one direction of one proxy."""

    requests: int = 0
    successes: int = 0
    buckets: tuple[tuple[float, float], ...] = ()  # response_latency_ms, summed over labels

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """One scrape of one proxy."""

    identity: str | None = None
    cert_expiry: float | None = None  # seconds since the epoch
    bundle_digest: str | None = None
    handshakes: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    inbound: HttpStats = HttpStats()
    outbound: HttpStats = HttpStats()
    tcp_inbound: int = 0  # connections accepted from the mesh

    def groups(self, direction: str | None = None) -> dict[str, int]:
        """Successful handshakes by negotiated group (one side, or both)."""
        out: dict[str, int] = {}
        for (side, group, result), n in self.handshakes.items():
            if result == "ok" and (direction is None or side == direction):
                out[group] = out.get(group, 0) + n
        return out

    @property
    def refused(self) -> int:
        return sum(n for (_, _, result), n in self.handshakes.items() if result != "ok")

    @property
    def http(self) -> tuple[str, HttpStats]:
        """The direction worth showing: what the workload serves, else what it sends."""
        if self.inbound.requests or not self.outbound.requests:
            return "inbound", self.inbound
        return "outbound", self.outbound


def parse_proxy_metrics(text: str) -> ProxyStats:
    """Read the families ``trustmesh proxy run`` exposes (unknown ones are ignored)."""
    handshakes: dict[tuple[str, str, str], int] = {}
    requests = {"inbound": 0, "outbound": 0}
    successes = {"inbound": 0, "outbound": 0}
    buckets: dict[str, dict[float, float]] = {"inbound": {}, "outbound": {}}
    identity = digest = None
    expiry: float | None = None
    tcp_inbound = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels, value = s.labels, s.value
            direction = labels.get("direction", "")
            if s.name == "response_total" and direction in requests:
                requests[direction] += int(value)
                if labels.get("classification") == "success":
                    successes[direction] += int(value)
            elif s.name == "response_latency_ms_bucket" and direction in buckets:
                le = float(labels["le"])
                buckets[direction][le] = buckets[direction].get(le, 0.0) + value
            elif s.name == "tls_handshakes_total":
                key = (direction, labels.get("group", ""), labels.get("result", ""))
                handshakes[key] = handshakes.get(key, 0) + int(value)
            elif s.name == "tcp_open_total":
                if direction == "inbound" and labels.get("peer") == "src":
                    tcp_inbound += int(value)
            elif s.name == "identity_cert_expiration_timestamp_seconds" and value > 0:
                expiry = value
            elif s.name == "trustmesh_proxy_identity_info":
                identity = labels.get("identity")
            elif s.name == "trustmesh_proxy_trust_bundle_info":
                digest = labels.get("digest")

    def http(direction: str) -> HttpStats:
        return HttpStats(
            requests[direction],
            successes[direction],
            tuple(sorted(buckets[direction].items())),
        )

    return ProxyStats(
        identity, expiry, digest, handshakes, http("inbound"), http("outbound"), tcp_inbound
    )


def scrape(address: str, timeout: float = 2.0) -> ProxyStats | None:
    """GET ``http://address/metrics`` and parse it; None when the proxy does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
            return parse_proxy_metrics(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def mesh_tls_groups(stats: Iterable[ProxyStats | None]) -> dict[str, int]:
    """Mesh connections by negotiated group, each counted once (at its client side)."""
    total: dict[str, int] = {}
    for s in stats:
        if s is None:
            continue
        for group, n in s.groups("outbound").items():
            total[group] = total.get(group, 0) + n
    return total
