"""Prometheus metrics of the identity service.

Issuance is counted in :class:`IssuanceStats`, plain counters that are cheap on the hot path and
that worker processes can ship to the supervisor as a snapshot; a custom collector renders them,
summed over all workers, together with the issuer and anchor expiry gauges and reload counts.

Names (listed in README):

- ``identity_issuance_total{result}``: Certify calls by result (``ok`` or the refusal reason);
- ``identity_issuance_duration_seconds``: Certify latency histogram (server side);
- ``issuer_cert_ttl_seconds``: seconds until the issuer chain's NotAfter (Linkerd's name);
- ``identity_issuer_not_after_timestamp_seconds``: the issuer chain's NotAfter;
- ``identity_trust_anchor_not_after_timestamp_seconds{fingerprint,subject}``: each anchor's;
- ``identity_issuer_reloads_total{result}``: issuer reloads, ``updated``/``unchanged``/
  ``refused`` (a new issuer failed validation and the old one was kept)/``error`` (unreadable);
- ``identity_issuer_ready``: 1 when a valid issuer is loaded;
- ``trustmesh_cert_{not_before,not_after,renewal_due}_timestamp_seconds{role,subject,
  fingerprint,source}`` for the issuer and each anchor, and ``trustmesh_trust_bundle_info{digest,
  source}``: the same families the expiry exporter publishes, so the alert rules apply to a
  scrape of the identity service directly (their definitions, in :mod:`identity.families`, are
  shared with proxies);
- ``identity_caller_trust_bundles{digest,current}``: identities holding a valid certificate, by
  the trust bundle digest their proxy reported when it was issued (:mod:`identity.bundlereports`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from identity.bundlereports import BundleReports, reports_family
from identity.errors import RESULTS
from identity.families import GaugeFamily, bundle_family, certificate_families
from identity.issuer import Issuer

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
RELOAD_RESULTS = ("updated", "unchanged", "refused", "error")


@dataclass(slots=True)
class IssuanceStats:
    """Issuance counters of one process. Mutated only on its event loop thread."""

    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, result: str, seconds: float) -> None:
        self.results[result] = self.results.get(result, 0) + 1
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "results": dict(self.results),
            "buckets": list(self.buckets),
            "sum": self.latency_sum,
        }

    @staticmethod
    def merged(snapshots: list[Mapping[str, object]]) -> IssuanceStats:
        total = IssuanceStats()
        for snap in snapshots:
            results = snap.get("results", {})
            buckets = snap.get("buckets", [])
            assert isinstance(results, dict) and isinstance(buckets, list)
            for name, count in results.items():
                total.results[name] = total.results.get(name, 0) + int(count)
            for i, count in enumerate(buckets[: len(total.buckets)]):
                total.buckets[i] += int(count)
            s = snap.get("sum", 0.0)
            total.latency_sum += float(s) if isinstance(s, int | float) else 0.0
        return total


class ReloadStats:
    """Issuer reload outcomes; written by the watcher thread or task, read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(RELOAD_RESULTS, 0)

    def count(self, result: str) -> None:
        if result not in self._counts:
            raise ValueError(f"unknown reload result {result!r}")
        with self._lock:
            self._counts[result] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class IdentityCollector(Collector):
    """Renders the identity metrics at scrape time, reading the issuer and clock then."""

    def __init__(
        self,
        *,
        issuer: Callable[[], Issuer | None],
        ready: Callable[[], bool],
        clock: Callable[[], datetime],
        issuance: Callable[[], IssuanceStats],
        reloads: ReloadStats,
        reports: BundleReports | None = None,
    ) -> None:
        self._issuer = issuer
        self._ready = ready
        self._clock = clock
        self._issuance = issuance
        self._reloads = reloads
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        stats = self._issuance()
        total = CounterMetricFamily(
            "identity_issuance", "Certify calls by result.", labels=["result"]
        )
        for result, count in sorted(stats.results.items()):
            total.add_metric([result], count)
        yield total
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.buckets, strict=True):
            running += count
            cumulative.append((_le(bound), running))
        yield HistogramMetricFamily(
            "identity_issuance_duration_seconds",
            "Server-side Certify latency.",
            buckets=cumulative,
            sum_value=stats.latency_sum,
        )
        reloads = CounterMetricFamily(
            "identity_issuer_reloads", "Issuer reloads by result.", labels=["result"]
        )
        for result, count in self._reloads.counts().items():
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily(
            "identity_issuer_ready", "1 when a valid issuer is loaded.", value=int(self._ready())
        )
        issuer = self._issuer()
        if issuer is None:
            return
        now = self._clock()
        yield GaugeMetricFamily(
            "issuer_cert_ttl_seconds",
            "Seconds until the issuer chain's NotAfter.",
            value=(issuer.not_after - now).total_seconds(),
        )
        yield GaugeMetricFamily(
            "identity_issuer_not_after_timestamp_seconds",
            "NotAfter of the issuer chain in use (Unix time).",
            value=issuer.not_after.timestamp(),
        )
        anchors = GaugeMetricFamily(
            "identity_trust_anchor_not_after_timestamp_seconds",
            "NotAfter of each trust anchor (Unix time).",
            labels=["fingerprint", "subject"],
        )
        for anchor in issuer.bundle.anchors:
            anchors.add_metric(
                [anchor.fingerprint[:16], anchor.subject], anchor.not_after.timestamp()
            )
        yield anchors
        certificates = [
            ("issuer", issuer.credential.certificate),
            *(("trust_anchor", a) for a in issuer.bundle.anchors),
        ]
        for family in certificate_families(certificates, "identity"):
            yield prometheus_family(family)
        yield prometheus_family(
            bundle_family(issuer.bundle.digest, "identity", "trustmesh_trust_bundle_info")
        )
        if self._reports is not None:
            yield reports_family(self._reports.counts(now.timestamp()), issuer.bundle.digest)


def prometheus_family(family: GaugeFamily) -> GaugeMetricFamily:
    """One of :mod:`identity.families`' values as prometheus_client's."""
    out = GaugeMetricFamily(family.name, family.help, labels=list(family.labels))
    for labels, value in family.samples:
        out.add_metric(list(labels), value)
    return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class ProcessFamilies(Collector):
    """prometheus_client's ``process_*`` families (``process_open_fds``,
    ``process_resident_memory_bytes``...) of the main process, unlabelled as usual, and of each
    live worker (``--workers N``) in the same families, labelled ``worker="1"``... Every
    connected proxy holds a connection, and so a descriptor, in whichever process accepted it:
    a worker near its descriptor limit shows (and alerts) as the main process would."""

    def __init__(self, workers: Callable[[], Iterable[tuple[int, int]]] = tuple) -> None:
        self._workers = workers  # (worker number, pid) of the live workers

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        sources: list[tuple[dict[str, str], ProcessCollector]] = [
            ({}, ProcessCollector(registry=None))
        ]
        for number, pid in self._workers():
            sources.append(
                ({"worker": str(number)}, ProcessCollector(pid=_fixed(pid), registry=None))
            )
        for extra, source in sources:  # a worker gone meanwhile yields nothing
            for family in source.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, **extra}, sample.value)
        yield from merged.values()


def _fixed(pid: int) -> Callable[[], int]:
    return lambda: pid


def new_registry(
    collector: IdentityCollector, workers: Callable[[], Iterable[tuple[int, int]]] = tuple
) -> CollectorRegistry:
    """The service's families, and its processes' (:class:`ProcessFamilies`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(ProcessFamilies(workers))
    return registry
