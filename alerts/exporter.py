"""The expiry exporter: a background refresher scans the sources, a Prometheus collector renders
the latest scan at scrape time.

A scrape never waits for a source: probes and store reads run in the refresher thread (each
probe bounded by its own timeout, all sources read concurrently), and ``collect()`` only reads
the last :class:`~alerts.inventory.Inventory`. Metric names are listed in the README section
"Alerts, runbooks and health checks"; the identity service, proxies and injector publish the
``trustmesh_cert_*`` families under the same names and labels.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from alerts.errors import AlertsError
from alerts.inventory import Inventory, Reading, build_inventory
from alerts.sources import Source

log = logging.getLogger(__name__)

CERT_LABELS = ("role", "subject", "fingerprint", "source")
DEFAULT_INTERVAL = 30.0
# Seconds a scrape connection may stay silent. prometheus_client's own server has no limit,
# so each connection opened and left idle held a thread for ever.
CLIENT_TIMEOUT = 10.0


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr otherwise


def _serve(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """``/metrics`` of ``registry`` on host:port, one daemon thread per connection."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="alerts-metrics", daemon=True).start()
    return server


def scan(sources: Sequence[Source], now: float, *, workers: int = 8) -> Inventory:
    """Read every source concurrently and gather the results taken at ``now``."""

    def read(source: Source) -> Reading | Exception:
        try:
            return source.read()
        except (AlertsError, OSError, ValueError) as e:
            return e

    if not sources:
        return Inventory(now)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        readings = list(pool.map(read, sources))
    return build_inventory(now, zip((s.name for s in sources), readings, strict=True))


class InventoryCollector(Collector):
    """Renders an inventory (and cumulative per-source error counts) as Prometheus metrics."""

    def __init__(self, snapshot: Callable[[], tuple[Inventory | None, dict[str, int]]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the label values are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        inventory, errors = self._snapshot()
        families = {
            "not_before": GaugeMetricFamily(
                "trustmesh_cert_not_before_timestamp_seconds",
                "NotBefore of a certificate, in seconds since the epoch.",
                labels=CERT_LABELS,
            ),
            "not_after": GaugeMetricFamily(
                "trustmesh_cert_not_after_timestamp_seconds",
                "NotAfter of a certificate, in seconds since the epoch.",
                labels=CERT_LABELS,
            ),
            "renewal_due": GaugeMetricFamily(
                "trustmesh_cert_renewal_due_timestamp_seconds",
                "When the certificate's renewal policy makes it due, in seconds since the epoch.",
                labels=CERT_LABELS,
            ),
        }
        up = GaugeMetricFamily(
            "trustmesh_cert_source_up",
            "1 if the last scan read the source, 0 if it failed.",
            labels=("source",),
        )
        errors_total = CounterMetricFamily(
            "trustmesh_cert_source_errors",
            "Scans of the source that failed since the exporter started.",
            labels=("source",),
        )
        bundles = GaugeMetricFamily(
            "trustmesh_trust_bundle_info",
            "The digest of the current trust bundle a source holds (value always 1).",
            labels=("digest", "source"),
        )
        refreshed = GaugeMetricFamily(
            "trustmesh_exporter_last_refresh_timestamp_seconds",
            "When the exporter last finished scanning its sources.",
        )
        if inventory is not None:
            for cert in inventory.certs:
                values = [cert.role, cert.subject, cert.fingerprint, cert.source]
                families["not_before"].add_metric(values, cert.not_before)
                families["not_after"].add_metric(values, cert.not_after)
                families["renewal_due"].add_metric(values, cert.renewal_due)
            for status in inventory.sources:
                up.add_metric([status.source], 1.0 if status.ok else 0.0)
            for digest, source in inventory.bundles:
                bundles.add_metric([digest, source], 1.0)
            refreshed.add_metric([], inventory.taken_at)
        for source, count in sorted(errors.items()):
            errors_total.add_metric([source], float(count))
        yield from families.values()
        yield from (up, errors_total, bundles, refreshed)


class Exporter:
    """Scans ``sources`` every ``interval`` seconds in a thread and serves the result.

    ``clock`` gives the scan time (seconds since the epoch); it is a parameter so tests can run
    the exporter at any date.
    """

    def __init__(
        self,
        sources: Sequence[Source] | Callable[[], Sequence[Source]],
        *,
        clock: Callable[[], float],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"the refresh interval must be positive, got {interval}")
        # A callable is asked for the sources at every scan: the set may change while the
        # exporter runs for days (the proxies of a `trustmesh up` restarted on other ports).
        if callable(sources):
            self._sources = sources
        else:
            fixed = tuple(sources)
            self._sources = lambda: fixed
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._inventory: Inventory | None = None
        self._errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(InventoryCollector(self.snapshot))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, ...

    @property
    def sources(self) -> tuple[Source, ...]:
        """The sources the next scan reads."""
        return tuple(self._sources())

    def snapshot(self) -> tuple[Inventory | None, dict[str, int]]:
        with self._lock:
            return self._inventory, dict(self._errors)

    def refresh(self) -> Inventory:
        """Scan once now and publish the result; returns it."""
        inventory = scan(self.sources, self._clock())
        with self._lock:
            self._inventory = inventory
            # A source no longer scanned takes its error counter with it.
            current = {status.source for status in inventory.sources}
            self._errors = {k: v for k, v in self._errors.items() if k in current}
            for status in inventory.errors:
                self._errors[status.source] = self._errors.get(status.source, 0) + 1
            for status in inventory.sources:
                self._errors.setdefault(status.source, 0)
        return inventory

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a fault in one scan must not stop every later one
                log.exception("certificate scan failed; the last scan's figures stay published")
            self._stop.wait(self.interval)

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port (0 picks a free port) and start refreshing; returns
        the bound port."""
        server = _serve(host, port, self.registry)
        self._server = server
        self._thread = threading.Thread(target=self._run, name="alerts-exporter", daemon=True)
        self._thread.start()
        return int(server.server_port)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
