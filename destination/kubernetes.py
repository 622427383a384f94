"""The Kubernetes source: Services, EndpointSlices, Pods, Namespaces and the policy resources.

Each resource is kept current by a :class:`destination.kubewatch.Reflector` (list, watch,
re-list on resync or error with a jittered, capped backoff, so the watch never silently stops).
After changes, the :class:`ClusterState` is rebuilt (debounced) with the same parsers as the
mesh file and published. An object that does not parse is skipped and logged, never allowed to
block the rest of the cluster. Nothing is published until every resource has been listed once,
so the service is not ready on a partial view.

Pods and Services inherit their Namespace's ``opaque-ports`` and ``default-inbound-policy``
annotations (``config.trustmesh.io/`` or ``config.linkerd.io/``) for each setting they do not
annotate themselves, as Linkerd does: the object's own annotation wins.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from destination.errors import InvalidResource
from destination.kubewatch import Reflector, run_reflectors
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
# Namespaces are watched only for the annotations their Pods and Services inherit.
NAMESPACES = Kind("namespaces", "v1", "Namespace")
INHERITED_SETTINGS = ("opaque-ports", "default-inbound-policy")
ANNOTATION_PREFIXES = ("config.trustmesh.io/", "config.linkerd.io/")


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

    if kind.plural == "namespaces":
        return client.CoreV1Api(api).list_namespace, {}
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
    """Publishes a :class:`ClusterState` built from every watched resource, after each change."""

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
        self._publish = publish
        self._metrics = metrics
        self._debounce = debounce
        rng = rng or random.Random()
        self.reflectors = {
            k.plural: Reflector(
                k.plural,
                *_list_function(api, k),
                metrics,
                transform=functools.partial(_typed, kind=k),
                resync=resync.total_seconds(),
                max_backoff=max_backoff,
                rng=random.Random(rng.random()),
            )
            for k in (*KINDS, NAMESPACES)
        }
        self.skipped: dict[str, str] = {}  # "<Kind> ns/name" -> why it was skipped

    def ready(self) -> bool:
        """Every resource has been listed once (nothing is published on a partial view)."""
        return all(r.synced for r in self.reflectors.values())

    def build(self) -> ClusterState:
        """The state from every object seen so far (skipping objects that do not parse)."""
        namespaces = {
            name: obj for (_, name), obj in self.reflectors["namespaces"].objects().items()
        }
        resources: list[Resource] = []
        skipped: dict[str, str] = {}
        for kind in KINDS:
            for obj in self.reflectors[kind.plural].objects().values():
                inherited = None
                if kind.plural in ("pods", "services"):
                    obj, inherited = inherit_namespace_annotations(
                        obj, namespaces.get(_key(obj)[0])
                    )
                try:
                    r = parse_resource(obj)
                except InvalidResource as e:
                    why = str(e)
                    if inherited:
                        why += f" (annotations inherited from Namespace {inherited})"
                    skipped[describe(obj)] = why
                    continue
                if r is not None:
                    resources.append(r)
        for what, why in skipped.items():
            if self.skipped.get(what) != why:
                log.warning("kubernetes: skipping %s: %s", what, why)
        self.skipped = skipped
        return build_state(resources, "kubernetes")

    def _apply(self) -> None:
        if not self.ready():
            return
        try:
            state = self.build()
        except InvalidResource as e:
            self._metrics.reload("kubernetes", "refused")
            log.error("kubernetes state refused, keeping the last good one: %s", e)
            return
        self._publish(state)
        self._metrics.reload("kubernetes", "applied")

    async def run(self, stop: asyncio.Event) -> None:
        await run_reflectors(
            list(self.reflectors.values()), self._apply, stop, debounce=self._debounce
        )


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name")))


def _typed(obj: dict[str, Any], kind: Kind) -> dict[str, Any]:
    # Items of a list carry no apiVersion/kind; the parser dispatches on them.
    return {
        **obj,
        "apiVersion": obj.get("apiVersion") or kind.api_version,
        "kind": obj.get("kind") or kind.kind,
    }


def inherit_namespace_annotations(
    obj: dict[str, Any], namespace: dict[str, Any] | None
) -> tuple[dict[str, Any], str | None]:
    """``obj`` with its Namespace's opaque-ports / default-inbound-policy annotations for each
    setting it does not annotate itself (in either prefix: the object's own always wins), and
    the Namespace's name when anything was inherited."""
    ns_meta = (namespace or {}).get("metadata") or {}
    ns_annotations = ns_meta.get("annotations") or {}
    if not isinstance(ns_annotations, dict) or not ns_annotations:
        return obj, None
    meta = obj.get("metadata") or {}
    own = meta.get("annotations") or {}
    if not isinstance(own, dict):
        return obj, None  # the parser reports the malformed field
    merged = dict(own)
    for setting in INHERITED_SETTINGS:
        if any(f"{prefix}{setting}" in own for prefix in ANNOTATION_PREFIXES):
            continue
        for prefix in ANNOTATION_PREFIXES:
            value = ns_annotations.get(f"{prefix}{setting}")
            if value is not None:
                merged[f"{prefix}{setting}"] = value
    if merged == own:
        return obj, None
    return {**obj, "metadata": {**meta, "annotations": merged}}, str(ns_meta.get("name"))
