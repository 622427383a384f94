"""Prometheus metrics of the destination service, on a registry of its own (one per server, so
tests can run several servers in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

STREAMS = ("destination", "profile", "inbound", "outbound", "trust_bundle")


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            # A registry of its own also gets the process families (memory, descriptors: every
            # proxy holds a connection and its streams); a shared one has its owner's.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        r = self.registry
        self.subscribers = Gauge(
            "trustmesh_destination_subscribers",
            "Open streams, by stream kind.",
            ["stream"],
            registry=r,
        )
        self.updates = Counter(
            "trustmesh_destination_updates_sent",
            "Messages sent to subscribers, by stream kind.",
            ["stream"],
            registry=r,
        )
        self.reloads = Counter(
            "trustmesh_destination_reloads",
            "Source reloads by result: applied, unchanged, refused.",
            ["source", "result"],
            registry=r,
        )
        self.topics = Gauge(
            "trustmesh_destination_topics", "Distinct questions being watched.", registry=r
        )
        self.generation = Gauge(
            "trustmesh_destination_state_generation",
            "How many cluster states have been applied since start.",
            registry=r,
        )
        self.last_reload_ok = Gauge(
            "trustmesh_destination_last_reload_ok",
            "1 when the last reload of the source was applied or unchanged, 0 when refused.",
            ["source"],
            registry=r,
        )
        self.bundle_refreshes = Counter(
            "trustmesh_destination_trust_bundle_refreshes",
            "Trust bundle reads by result: applied, unchanged, failed.",
            ["result"],
            registry=r,
        )
        self.watch_restarts = Counter(
            "trustmesh_destination_kubernetes_watch_restarts",
            "Kubernetes list/watch restarts by resource and reason: resync, closed, expired, "
            "error, missing.",
            ["resource", "reason"],
            registry=r,
        )
        for s in STREAMS:
            self.subscribers.labels(s)
            self.updates.labels(s)

    def reload(self, source: str, result: str) -> None:
        self.reloads.labels(source, result).inc()
        self.last_reload_ok.labels(source).set(0 if result == "refused" else 1)
