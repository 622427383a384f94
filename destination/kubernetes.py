"""The Kubernetes source: Services, EndpointSlices, Pods and the policy resources, watched.

One thread per resource lists it, then watches it with the official client; the watch's read
timeout doubles as the resync period (no event for ``resync`` means re-list), and any error
re-lists after a jittered backoff, so the watch never silently stops. Each change marks the
state dirty; an asyncio task rebuilds the :class:`ClusterState` (debounced) with the same parsers
as the mesh file and publishes it. An object that does not parse is skipped and counted, never
allowed to block the rest of the cluster. Nothing is published until every resource has been
listed once, so the service is not ready on a partial view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from destination.errors import InvalidResource
from destination.meshfile import build_state
from destination.metrics import ServiceMetrics
from destination.parsing import describe, parse_resource
from destination.resources import ClusterState, Resource

log = logging.getLogger(__name__)

POLICY_GROUP, POLICY_VERSION = "policy.trustmesh.io", "v1alpha1"
GATEWAY_GROUP, GATEWAY_VERSION = "gateway.networking.k8s.io", "v1"


@dataclass(frozen=True, slots=True)
class Kind:
    """One watched resource: how to list it and what apiVersion/kind its items have."""

    plural: str
    api_version: str
    kind: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


KINDS = (
    Kind("pods", "v1", "Pod"),
    Kind("services", "v1", "Service"),
    Kind("endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    Kind("servers", f"{POLICY_GROUP}/{POLICY_VERSION}", "Server"),
    Kind("authorizationpolicies", f"{POLICY_GROUP}/{POLICY_VERSION}", "AuthorizationPolicy"),
    Kind("meshtlsauthentications", f"{POLICY_GROUP}/{POLICY_VERSION}", "MeshTLSAuthentication"),
    Kind("networkauthentications", f"{POLICY_GROUP}/{POLICY_VERSION}", "NetworkAuthentication"),
    Kind("httproutes", f"{GATEWAY_GROUP}/{GATEWAY_VERSION}", "HTTPRoute"),
)


def api_client(kubeconfig: Path | None = None) -> Any:
    """An ApiClient from in-cluster config, else ``kubeconfig`` / ``~/.kube/config``."""
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None)
    return client.ApiClient()


def _list_function(api: Any, kind: Kind) -> tuple[Callable[..., Any], dict[str, Any]]:
    from kubernetes import client

    if kind.plural == "pods":
        return client.CoreV1Api(api).list_pod_for_all_namespaces, {}
    if kind.plural == "services":
        return client.CoreV1Api(api).list_service_for_all_namespaces, {}
    if kind.plural == "endpointslices":
        return client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces, {}
    custom = client.CustomObjectsApi(api)
    return custom.list_cluster_custom_object, {
        "group": kind.group,
        "version": kind.version,
        "plural": kind.plural,
    }


class KubernetesSource:
    def __init__(
        self,
        api: Any,
        publish: Callable[[ClusterState], None],
        metrics: ServiceMetrics,
        *,
        resync: timedelta = timedelta(minutes=5),
        debounce: float = 0.02,
        max_backoff: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._publish = publish
        self._metrics = metrics
        self._resync = resync.total_seconds()
        self._debounce = debounce
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            k.plural: {} for k in KINDS
        }
        self._synced: set[str] = set()
        self._halt = threading.Event()
        self._dirty: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.skipped: dict[str, str] = {}  # "<Kind> ns/name" -> why it was skipped

    # --- watch threads ----------------------------------------------------------------------

    def _mark(self) -> None:
        if self._loop is not None and self._dirty is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def _watch(self, kind: Kind) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        list_fn, kwargs = _list_function(self._api, kind)
        attempt = 0
        while not self._halt.is_set():
            try:
                resp = list_fn(**kwargs, _preload_content=False, _request_timeout=(5, 30))
                items = json.loads(resp.data).get("items") or []
                fresh = {self._key(o): self._typed(o, kind) for o in items if isinstance(o, dict)}
                with self._lock:
                    self._objects[kind.plural] = fresh
                    self._synced.add(kind.plural)
                self._mark()
                attempt = 0
                w = watch.Watch()
                for event in w.stream(list_fn, **kwargs, _request_timeout=(5, self._resync)):
                    if self._halt.is_set():
                        w.stop()
                        break
                    obj = event.get("raw_object")
                    if event.get("type") == "ERROR" or not isinstance(obj, dict):
                        break  # e.g. 410 Gone: re-list
                    with self._lock:
                        if event["type"] == "DELETED":
                            self._objects[kind.plural].pop(self._key(obj), None)
                        else:
                            self._objects[kind.plural][self._key(obj)] = self._typed(obj, kind)
                    self._mark()
                self._metrics.reload("kubernetes", "resync")
            except ApiException as e:
                if e.status == 404:
                    # CRD not installed: an empty resource, looked for again later.
                    with self._lock:
                        self._objects[kind.plural] = {}
                        self._synced.add(kind.plural)
                    self._mark()
                log.warning("kubernetes %s: %s %s", kind.plural, e.status, e.reason)
                attempt += 1
            except Exception as e:  # connection reset, read timeout, bad JSON: re-list
                log.info(
                    "kubernetes %s watch ended (%s); re-listing", kind.plural, type(e).__name__
                )
                attempt += 1 if not _is_timeout(e) else 0
            if attempt:
                delay = min(self._max_backoff, 0.2 * 2 ** min(attempt, 10))
                self._halt.wait(delay * (0.5 + self._rng.random() / 2))

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return (str(meta.get("namespace") or "default"), str(meta.get("name")))

    @staticmethod
    def _typed(obj: dict[str, Any], kind: Kind) -> dict[str, Any]:
        # Items of a list carry no apiVersion/kind; the parser dispatches on them.
        return {
            **obj,
            "apiVersion": obj.get("apiVersion") or kind.api_version,
            "kind": obj.get("kind") or kind.kind,
        }

    # --- state ------------------------------------------------------------------------------

    def build(self) -> ClusterState:
        """The state from every object seen so far (skipping objects that do not parse)."""
        with self._lock:
            everything = [o for objs in self._objects.values() for o in objs.values()]
        resources: list[Resource] = []
        skipped: dict[str, str] = {}
        for obj in everything:
            try:
                r = parse_resource(obj)
            except InvalidResource as e:
                skipped[describe(obj)] = str(e)
                continue
            if r is not None:
                resources.append(r)
        for what, why in skipped.items():
            if self.skipped.get(what) != why:
                log.warning("kubernetes: skipping %s: %s", what, why)
        self.skipped = skipped
        return build_state(resources, "kubernetes")

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        threads = [
            threading.Thread(target=self._watch, args=(k,), name=f"k8s-{k.plural}", daemon=True)
            for k in KINDS
        ]
        for t in threads:
            t.start()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(self._dirty.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if stop.is_set():
                    break
                await asyncio.sleep(self._debounce)  # coalesce bursts of events
                self._dirty.clear()
                with self._lock:
                    ready = len(self._synced) == len(KINDS)
                if not ready:
                    continue
                try:
                    state = self.build()
                except InvalidResource as e:
                    self._metrics.reload("kubernetes", "refused")
                    log.error("kubernetes state refused, keeping the last good one: %s", e)
                    continue
                self._publish(state)
                self._metrics.reload("kubernetes", "applied")
        finally:
            stopper.cancel()
            self._halt.set()
            for t in threads:
                await asyncio.to_thread(t.join, 2.0)


def _is_timeout(e: Exception) -> bool:
    return "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower()
