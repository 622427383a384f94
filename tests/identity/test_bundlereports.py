"""Trust-bundle reports: per identity, the latest digest until its certificate expires."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from identity.bundlereports import (
    INVALID,
    MAX_DIGEST_LABELS,
    OTHER,
    UNREPORTED,
    BundleReports,
    digest_label,
    reports_family,
)

OLD, NEW = "a" * 64, "b" * 64


def test_digest_labels() -> None:
    assert digest_label("") == UNREPORTED
    assert digest_label(OLD) == OLD
    for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, "x" * 10_000, "é" * 64):
        assert digest_label(bad) == INVALID


def test_latest_report_per_identity_until_its_certificate_expires() -> None:
    r = BundleReports()
    r.record("web", OLD, valid_until=100)
    r.record("api", OLD, valid_until=150)
    r.record("web", NEW, valid_until=200)  # web renewed after picking up the new bundle
    r.record("linkerd-proxy", "", valid_until=300)
    assert r.counts(now=50) == Counter({OLD: 1, NEW: 1, UNREPORTED: 1})
    assert r.counts(now=150) == Counter({NEW: 1, UNREPORTED: 1})  # api's certificate expired
    assert len(r) == 2


def test_capacity_drops_the_least_recently_renewed() -> None:
    r = BundleReports(capacity=2)
    r.record("a", OLD, 100)
    r.record("b", OLD, 100)
    r.record("a", NEW, 100)  # a is now the most recent
    r.record("c", NEW, 100)
    assert r.counts(now=0) == Counter({NEW: 2})
    with pytest.raises(ValueError, match="positive"):
        BundleReports(capacity=0)


def test_worker_changes_merge_with_the_later_certificate_winning() -> None:
    worker, main = BundleReports(), BundleReports()
    main.record("web", NEW, valid_until=200)
    worker.record("web", OLD, valid_until=100)  # older certificate, seen by the worker
    worker.record("api", OLD, valid_until=100)
    changes = worker.drain()
    assert worker.drain() == {}  # drained once
    main.merge(changes)
    assert main.counts(now=0) == Counter({NEW: 1, OLD: 1})
    main.merge({"db": ("not-a-digest", 100.0)})  # labels are re-checked on merge
    assert main.counts(now=0)[INVALID] == 1


def _samples(family: object) -> dict[tuple[str, str], float]:
    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield family

    registry = CollectorRegistry()
    registry.register(One())
    text = generate_latest(registry).decode()
    return {
        (s.labels["digest"], s.labels["current"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_family_marks_the_current_bundle_and_bounds_labels() -> None:
    counts = Counter({f"{i:064x}": 100 + i for i in range(MAX_DIGEST_LABELS + 5)})
    counts[NEW] = 1  # the CA's current bundle, reported by one identity only
    samples = _samples(reports_family(counts, NEW))
    assert samples[(NEW, "true")] == 1  # always shown, however small
    assert len(samples) == MAX_DIGEST_LABELS + 1  # the shown digests plus "other"
    shown = sum(v for (d, _), v in samples.items() if d != OTHER)
    assert shown + samples[(OTHER, "false")] == sum(counts.values())
    assert all(current == "false" for (d, current) in samples if d != NEW)
