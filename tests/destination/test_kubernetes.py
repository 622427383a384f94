"""The Kubernetes source against kmock (a real HTTP server speaking the Kubernetes API) with the
official client. kmock ignores label selectors and resourceVersion; the source relies on neither."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from destination_testlib import eventually
from kmock_testlib import emulated_api, pod
from kubernetes import client

from destination.endpoints import resolve_endpoints
from destination.inbound import resolve_inbound
from destination.kubernetes import KINDS, KubernetesSource
from destination.metrics import ServiceMetrics
from destination.paths import parse_authority
from destination.resources import ClusterState, MeshSettings

SETTINGS = MeshSettings()


@pytest.fixture
async def k8s() -> AsyncIterator[tuple[Any, client.ApiClient]]:
    async with emulated_api() as (emulator, _server, api):
        yield emulator, api


async def test_services_slices_pods_and_policy_are_watched(
    k8s: tuple[Any, client.ApiClient],
) -> None:
    _emulator, api = k8s
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    custom = client.CustomObjectsApi(api)
    states: list[ClusterState] = []
    source = KubernetesSource(api, states.append, ServiceMetrics(), resync=timedelta(seconds=1))
    stop = asyncio.Event()
    task = asyncio.ensure_future(source.run(stop))
    try:
        await asyncio.to_thread(core.create_namespaced_pod, "default", pod("web-0", "10.0.0.5"))
        await asyncio.to_thread(
            core.create_namespaced_service,
            "default",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            },
        )
        await asyncio.to_thread(
            discovery.create_namespaced_endpoint_slice,
            "default",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "web-abc",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {
                        "addresses": ["10.0.0.5"],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "web-0"},
                    }
                ],
            },
        )
        target = parse_authority("web.default.svc.cluster.local:80")

        def resolved() -> Any:
            if not states:
                return None
            eps = resolve_endpoints(states[-1], SETTINGS, target)
            return eps if eps.endpoints else None

        eps = await eventually(resolved, timeout=10)
        (ep,) = eps.endpoints
        assert ep.key == ("10.0.0.5", 8080)
        assert ep.identity == "web.default.serviceaccount.identity.trustmesh.cluster.local"
        assert ep.opaque_inbound_port == 4143 and ep.protocol_hint == "h2"

        # A Server + AuthorizationPolicy CRD arrive through the custom-objects API.
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            "policy.trustmesh.io",
            "v1alpha1",
            "default",
            "servers",
            {
                "apiVersion": "policy.trustmesh.io/v1alpha1",
                "kind": "Server",
                "metadata": {"name": "web-http", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": "http"},
            },
        )
        policy = await eventually(
            lambda: (
                states
                and resolve_inbound(states[-1], SETTINGS, "default", "web-0", 8080).server.name
                == "web-http"
                and resolve_inbound(states[-1], SETTINGS, "default", "web-0", 8080)
            ),
            timeout=10,
        )
        assert policy.authorizations == ()  # a Server denies what nothing authorizes

        # Deleting the pod's slice endpoint removes it.
        await asyncio.to_thread(discovery.delete_namespaced_endpoint_slice, "web-abc", "default")
        await eventually(
            lambda: not resolve_endpoints(states[-1], SETTINGS, target).endpoints, timeout=10
        )
        assert source.skipped == {}
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_bad_object_is_skipped_not_fatal(k8s: tuple[Any, client.ApiClient]) -> None:
    _emulator, api = k8s
    core = client.CoreV1Api(api)
    states: list[ClusterState] = []
    source = KubernetesSource(api, states.append, ServiceMetrics(), resync=timedelta(seconds=1))
    stop = asyncio.Event()
    task = asyncio.ensure_future(source.run(stop))
    try:
        await asyncio.to_thread(core.create_namespaced_pod, "default", pod("web-0", "10.0.0.5"))
        bad = pod("web-1", "10.0.0.6")
        bad["metadata"]["annotations"]["config.linkerd.io/opaque-ports"] = "nonsense-port"
        await asyncio.to_thread(core.create_namespaced_pod, "default", bad)
        await eventually(
            lambda: states and states[-1].workload("default", "web-0") and source.skipped,
            timeout=10,
        )
        assert "Pod default/web-1" in source.skipped
        assert "nonsense-port" in source.skipped["Pod default/web-1"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_shipped_crds_validate_and_match_the_watched_kinds() -> None:
    from pathlib import Path

    import kubernetes_validate
    import yaml

    path = Path(__file__).resolve().parents[2] / "destination" / "crds" / "policy.trustmesh.io.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    shipped = {(d["spec"]["group"], d["spec"]["names"]["plural"]) for d in docs}
    watched = {(k.group, k.plural) for k in KINDS if k.group == "policy.trustmesh.io"}
    assert shipped == watched


def bare_pod(name: str, ip: str, namespace: str, **annotations: str) -> dict[str, Any]:
    p = pod(name, ip, namespace=namespace)
    p["metadata"]["annotations"] = annotations
    return p


async def test_namespace_annotations_apply_unless_the_pod_has_its_own(
    k8s: tuple[Any, client.ApiClient],
) -> None:
    _emulator, api = k8s
    core = client.CoreV1Api(api)
    await asyncio.to_thread(
        core.create_namespace,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "shop",
                "annotations": {
                    "config.linkerd.io/opaque-ports": "9000-9001",
                    "config.trustmesh.io/default-inbound-policy": "deny",
                },
            },
        },
    )
    plain = bare_pod("plain", "10.0.1.1", "shop")
    # Its own opaque ports (under the other prefix) win; the policy still comes from the namespace.
    own = bare_pod("own", "10.0.1.2", "shop", **{"config.trustmesh.io/opaque-ports": "5432"})
    elsewhere = bare_pod("elsewhere", "10.0.2.1", "default")
    for p in (plain, own, elsewhere):
        await asyncio.to_thread(core.create_namespaced_pod, p["metadata"]["namespace"], p)
    states: list[ClusterState] = []
    source = KubernetesSource(api, states.append, ServiceMetrics(), resync=timedelta(seconds=5))
    stop = asyncio.Event()
    task = asyncio.ensure_future(source.run(stop))
    try:
        await eventually(lambda: states and len(states[-1].workloads) == 3, timeout=10)
        state = states[-1]
        a, b, c = (
            state.workload(ns, n)
            for ns, n in (("shop", "plain"), ("shop", "own"), ("default", "elsewhere"))
        )
        assert a.opaque_ports == {9000, 9001} and a.default_inbound_policy == "deny"
        assert b.opaque_ports == {5432} and b.default_inbound_policy == "deny"
        assert c.opaque_ports is None and c.default_inbound_policy is None
        assert resolve_inbound(state, SETTINGS, "shop", "plain", 8080).authorizations == ()
        assert resolve_inbound(state, SETTINGS, "default", "elsewhere", 8080).authorizations

        # A changed Namespace annotation is watched like everything else.
        await asyncio.to_thread(
            core.patch_namespace,
            "shop",
            {
                "metadata": {
                    "annotations": {
                        "config.trustmesh.io/default-inbound-policy": "all-authenticated"
                    }
                }
            },
        )
        await eventually(
            lambda: (
                states[-1].workload("shop", "plain").default_inbound_policy == "all-authenticated"
            ),
            timeout=10,
        )
        # A bad inherited value skips the pods that inherit it and says where it came from.
        await asyncio.to_thread(
            core.patch_namespace,
            "shop",
            {"metadata": {"annotations": {"config.linkerd.io/opaque-ports": "not-a-port"}}},
        )
        await eventually(lambda: "Pod shop/plain" in source.skipped, timeout=10)
        assert "inherited from Namespace shop" in source.skipped["Pod shop/plain"]
        assert "Pod shop/own" not in source.skipped  # its own annotation wins
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
