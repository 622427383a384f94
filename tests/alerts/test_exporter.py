from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from alerts_testkit import NOW, assert_silent_connections_closed, silent_server
from prometheus_client.parser import text_string_to_metric_families

import alerts.exporter as exporter_module
from alerts.exporter import Exporter, scan
from alerts.sources import ProbeSource, Source, StoreSource
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore


def _scrape(port: int) -> tuple[float, dict[str, list[tuple[dict[str, str], float]]]]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    took = time.monotonic() - started
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return took, samples


def _poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_exporter_serves_the_scan_and_never_blocks_a_scrape_on_a_probe(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=NOW)
    state = issue_issuer(store, now=NOW, lifetime=timedelta(hours=48))
    with silent_server() as silent:
        exporter = Exporter(
            [StoreSource(store.root), ProbeSource(silent, timeout=2.0)],
            clock=lambda: 1234.5,
            interval=60,
        )
        port = exporter.start("127.0.0.1", 0)
        try:
            # The first refresh is stuck on the silent probe for 2 s; scrapes answer at once.
            for _ in range(5):
                took, samples = _scrape(port)
                assert took < 0.5
            assert "trustmesh_exporter_last_refresh_timestamp_seconds" not in samples
            _poll(lambda: "trustmesh_exporter_last_refresh_timestamp_seconds" in _scrape(port)[1])
            _, samples = _scrape(port)
        finally:
            exporter.stop()
    source = f"store:{store.root}"
    assert samples["trustmesh_exporter_last_refresh_timestamp_seconds"] == [({}, 1234.5)]
    assert samples["process_open_fds"][0][1] >= 1  # the process families, for the fd alert
    not_after = {
        s[0]["role"]: (s[0], s[1]) for s in samples["trustmesh_cert_not_after_timestamp_seconds"]
    }
    issuer_labels, issuer_not_after = not_after["issuer"]
    assert issuer_labels == {
        "role": "issuer",
        "subject": state.issuer.certificate.subject,  # type: ignore[union-attr]
        "fingerprint": state.issuer.certificate.fingerprint,  # type: ignore[union-attr]
        "source": source,
    }
    assert issuer_not_after == state.issuer.certificate.not_after.timestamp()  # type: ignore[union-attr]
    assert len(samples["trustmesh_cert_not_before_timestamp_seconds"]) == 2
    assert len(samples["trustmesh_cert_renewal_due_timestamp_seconds"]) == 2
    up = {labels["source"]: value for labels, value in samples["trustmesh_cert_source_up"]}
    assert up == {source: 1.0, f"probe:{silent}": 0.0}
    errors = {
        labels["source"]: value for labels, value in samples["trustmesh_cert_source_errors_total"]
    }
    assert errors == {source: 0.0, f"probe:{silent}": 1.0}
    assert samples["trustmesh_trust_bundle_info"] == [
        ({"digest": state.bundle.digest, "source": source}, 1.0)  # type: ignore[union-attr]
    ]


def test_refresh_follows_a_rotation(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=NOW)
    first = issue_issuer(store, now=NOW).issuer.certificate  # type: ignore[union-attr]
    exporter = Exporter([StoreSource(store.root)], clock=lambda: 0.0, interval=60)
    assert first.fingerprint in {c.fingerprint for c in exporter.refresh().certs}
    second = issue_issuer(store, now=NOW + timedelta(hours=1)).issuer.certificate  # type: ignore[union-attr]
    fingerprints = {c.fingerprint for c in exporter.refresh().certs}
    assert second.fingerprint in fingerprints and first.fingerprint not in fingerprints


def test_scan_without_sources_is_empty() -> None:
    assert scan([], 7.0).certs == ()


def test_a_silent_scrape_connection_is_closed_and_ipv6_is_served(monkeypatch, tmp_path) -> None:
    """prometheus_client's server waited for ever on a connection that sent nothing, one
    thread each; now the server closes it after CLIENT_TIMEOUT and scrapes go on."""
    monkeypatch.setattr(exporter_module._Handler, "timeout", 0.5)
    exporter = Exporter([], clock=lambda: 1.0, interval=60)
    port = exporter.start("127.0.0.1", 0)
    try:
        assert_silent_connections_closed(port)
        assert "trustmesh_exporter_last_refresh_timestamp_seconds" in _scrape(port)[1]
    finally:
        exporter.stop()
    if socket.has_ipv6:
        six = Exporter([], clock=lambda: 1.0, interval=60)
        port = six.start("::1", 0)
        try:
            with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as r:
                assert r.status == 200
        finally:
            six.stop()


def test_sources_asked_anew_at_each_scan_and_a_vanished_source_leaves(tmp_path: Path) -> None:
    """Given a callable, the exporter asks it for the sources at every scan (the proxies of a
    restarted `trustmesh up` have other ports); a source no longer scanned takes its series
    and its error counter with it."""
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=NOW)
    issue_issuer(store, now=NOW)
    with silent_server() as silent:
        gone = ProbeSource(silent, timeout=0.2)
        current: list[Source] = [StoreSource(store.root), gone]
        exporter = Exporter(lambda: current, clock=lambda: 5.0, interval=60)
        first = exporter.refresh()
        assert {s.source for s in first.sources} == {f"store:{store.root}", gone.name}
        assert exporter.snapshot()[1] == {f"store:{store.root}": 0, gone.name: 1}
        current = [StoreSource(store.root)]
        second = exporter.refresh()
    assert {s.source for s in second.sources} == {f"store:{store.root}"}
    assert exporter.snapshot()[1] == {f"store:{store.root}": 0}
    assert exporter.sources == (current[0],)


def test_a_failing_scan_does_not_stop_the_refresher(caplog) -> None:
    calls = 0

    def sources() -> list[Source]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("discovery broke")
        return []

    exporter = Exporter(sources, clock=lambda: 9.0, interval=0.05)
    port = exporter.start("127.0.0.1", 0)
    try:
        _poll(lambda: "trustmesh_exporter_last_refresh_timestamp_seconds" in _scrape(port)[1])
    finally:
        exporter.stop()
    assert calls >= 2
    assert "certificate scan failed" in caplog.text and "discovery broke" in caplog.text
