"""Where the trust bundle comes from: a PEM file, or the credential store (``pki.store``).

A provider is any callable returning a :class:`TrustBundleSnapshot`; :func:`refresh_bundle`
calls it whenever its file changes (and every ``interval`` anyway) and publishes new digests, so
proxies learn new anchors without restarting. A failed read keeps the last good bundle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from destination.filewatch import watch_file
from destination.hub import Hub
from destination.metrics import ServiceMetrics
from destination.model import TrustBundleSnapshot
from pki.bundle import TrustBundle
from pki.errors import PKIError

log = logging.getLogger(__name__)

BundleProvider = Callable[[], TrustBundleSnapshot]


def snapshot_of(bundle: TrustBundle) -> TrustBundleSnapshot:
    return TrustBundleSnapshot(bundle.pem(), bundle.digest, bundle.fingerprints)


def file_provider(path: Path) -> BundleProvider:
    """Anchors from a PEM file (every certificate in it is an anchor)."""

    def read() -> TrustBundleSnapshot:
        return snapshot_of(TrustBundle.from_pem(Path(path).read_bytes()))

    return read


def store_provider(directory: Path) -> BundleProvider:
    """Anchors from a ``pki.store.FileStore`` directory."""
    from pki.store import FileStore

    store = FileStore(Path(directory))

    def read() -> TrustBundleSnapshot:
        return snapshot_of(store.trust_bundle())

    return read


def publish_bundle(provider: BundleProvider, hub: Hub, metrics: ServiceMetrics) -> str:
    """Read the bundle once and publish it when its digest changed; returns the outcome."""
    try:
        snapshot = provider()
    except (OSError, PKIError, ValueError) as e:
        metrics.bundle_refreshes.labels("failed").inc()
        log.error("trust bundle read failed, keeping the last good one: %s", e)
        return "failed"
    result = "applied" if hub.set_bundle(snapshot) else "unchanged"
    metrics.bundle_refreshes.labels(result).inc()
    return result


async def refresh_bundle(
    provider: BundleProvider,
    watched: Path | None,
    hub: Hub,
    metrics: ServiceMetrics,
    stop: asyncio.Event,
    interval: float = 5.0,
) -> None:
    """Republish the bundle on every change of ``watched`` (or every ``interval``)."""
    if watched is None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                publish_bundle(provider, hub, metrics)
        return
    async for _ in watch_file(watched, stop, poll_interval=interval):
        publish_bundle(provider, hub, metrics)
