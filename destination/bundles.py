"""Where the trust bundle comes from: a PEM file, the credential store (``pki.store``), or, with
``--kubernetes``, the trust-roots ConfigMap.

A provider is any callable returning a :class:`TrustBundleSnapshot`; :func:`refresh_bundle`
calls it whenever its file changes (and every ``interval`` anyway) and publishes new digests, so
proxies learn new anchors without restarting. A failed read keeps the last good bundle.

:class:`TrustRootsWatch` watches ConfigMap ``trustmesh-identity-trust-roots``, key
``ca-bundle.crt``, in the control-plane namespace (Linkerd's layout, TrustMesh's names) and
publishes each valid change. A missing, empty, unparseable or non-CA bundle is refused: the
reason is logged, ``trustmesh_destination_trust_bundle_refreshes_total{result="refused"}``
counts it, and the last good bundle stays served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from destination.errors import Unavailable
from destination.filewatch import watch_file
from destination.hub import Hub
from destination.kubewatch import Object, Reflector, run_reflectors
from destination.metrics import ServiceMetrics
from destination.model import TrustBundleSnapshot
from pki.bundle import TrustBundle
from pki.errors import PKIError

log = logging.getLogger(__name__)

# The same names the identity service and trust-manager use (identity.sources, certmanager).
TRUST_ROOTS_CONFIGMAP = "trustmesh-identity-trust-roots"
TRUST_ROOTS_KEY = "ca-bundle.crt"

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


class BundleRefused(ValueError):
    """A trust-roots ConfigMap whose bundle cannot be served; the message says why."""


def bundle_from_configmap(obj: Object | None, where: str) -> TrustBundleSnapshot:
    """The anchors of a trust-roots ConfigMap, or :class:`BundleRefused` naming the problem."""
    if obj is None:
        raise BundleRefused(f"{where} does not exist")
    data = obj.get("data")
    pem = data.get(TRUST_ROOTS_KEY) if isinstance(data, dict) else None
    if pem is None:
        raise BundleRefused(f"{where} has no key {TRUST_ROOTS_KEY}")
    if not isinstance(pem, str) or not pem.strip():
        raise BundleRefused(f"{where} key {TRUST_ROOTS_KEY} is empty")
    try:
        return snapshot_of(TrustBundle.from_pem(pem.encode()))
    except (PKIError, ValueError) as e:
        raise BundleRefused(f"{where} key {TRUST_ROOTS_KEY}: {e}") from None


class TrustRootsWatch:
    """Streams the trust-roots ConfigMap of ``namespace`` to the hub's trust-bundle topic."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        hub: Hub,
        metrics: ServiceMetrics,
        *,
        resync: timedelta = timedelta(minutes=5),
        max_backoff: float = 10.0,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.where = f"ConfigMap {namespace}/{TRUST_ROOTS_CONFIGMAP}"
        self._hub = hub
        self._metrics = metrics
        self._seen: object = ()  # the last data handled, so a resync does not re-log a refusal
        self.refused: str | None = None  # why the current ConfigMap is not served, if it is not
        self._served = False  # whether a good bundle has been published yet
        self.reflector = Reflector(
            "configmaps",
            client.CoreV1Api(api).list_namespaced_config_map,
            {"namespace": namespace, "field_selector": f"metadata.name={TRUST_ROOTS_CONFIGMAP}"},
            metrics,
            resync=resync.total_seconds(),
            max_backoff=max_backoff,
        )

    def apply(self) -> str:
        """Publish the ConfigMap's bundle if it changed; returns the outcome (also counted)."""
        if not self.reflector.synced:
            return "pending"
        # The field selector is a hint: test doubles (and proxies) may ignore it.
        found = [
            o for (_, name), o in self.reflector.objects().items() if name == TRUST_ROOTS_CONFIGMAP
        ]
        obj = found[0] if found else None
        data = obj.get("data") if obj is not None else None
        if data == self._seen:
            return "unchanged"
        self._seen = data
        try:
            snapshot = bundle_from_configmap(obj, self.where)
        except BundleRefused as e:
            self.refused = str(e)
            self._metrics.bundle_refreshes.labels("refused").inc()
            if self._served:
                log.error("trust bundle refused, keeping the last good one: %s", e)
            else:  # nothing good to keep: subscribers learn why there is no bundle
                log.error("trust bundle refused: %s", e)
                self._hub.set_bundle(Unavailable(f"no trust bundle: {e}"))
            return "refused"
        self.refused = None
        self._served = True
        result = "applied" if self._hub.set_bundle(snapshot) else "unchanged"
        self._metrics.bundle_refreshes.labels(result).inc()
        if result == "applied":
            log.info("trust bundle from %s applied (digest %s)", self.where, snapshot.digest)
        return result

    async def run(self, stop: asyncio.Event) -> None:
        await run_reflectors([self.reflector], self.apply, stop)
