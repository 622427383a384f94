"""The list/watch loop: bounded jittered backoff, and an API server restart while watches are
open (kmock stopped and started again on the same port) that Get subscribers ride through."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import kmock
from destination_testlib import eventually
from kmock_testlib import PromptShutdown, api_for, declare_resources, namespace_paths, pod
from kmock_testlib import selector_service as service
from kubernetes import client

from destination.client import Backoff, DestinationClient
from destination.kubewatch import Reflector
from destination.metrics import ServiceMetrics
from destination.service import DestinationServer, ServeOptions
from proxy.rpc import Channel

AUTHORITY = "web.default.svc.cluster.local:80"


def test_backoff_is_jittered_and_bounded() -> None:
    r = Reflector(
        "pods", lambda **_: None, {}, ServiceMetrics(), max_backoff=2.0, rng=random.Random(3)
    )
    assert r.backoff(0) == 0.0
    delays = [r.backoff(n) for n in range(1, 40)]
    assert all(0.2 <= d <= 2.0 for d in delays)
    assert delays[0] <= 0.4  # the first retry is prompt
    assert len({round(d, 6) for d in delays[10:]}) > 20  # capped, but still jittered
    assert min(delays[10:]) >= 1.0  # at the cap, jitter takes at most half off


def restarts(server: DestinationServer, resource: str, reason: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "trustmesh_destination_kubernetes_watch_restarts_total",
        {"resource": resource, "reason": reason},
    )
    return value or 0.0


async def test_changes_after_an_api_server_restart_reach_get_subscribers() -> None:
    with namespace_paths():
        async with kmock.KubernetesEmulator() as emulator:
            declare_resources(emulator, ("v1/configmaps",))
            first = kmock.Server(emulator, server_cls=PromptShutdown)
            await first.__aenter__()
            port = first.port
            api = api_for(first)
            core = client.CoreV1Api(api)
            second: kmock.Server | None = None
            try:
                await _call(core.create_namespaced_service, "default", service())
                await _call(core.create_namespaced_pod, "default", pod("web-0", "10.0.0.5"))
                options = ServeOptions(
                    listen="127.0.0.1:0",
                    admin_listen="127.0.0.1:0",
                    kubernetes=True,
                    resync=timedelta(seconds=20),  # longer than the test: no resync hides a gap
                )
                async with (
                    DestinationServer(options, kube_api=api) as server,
                    DestinationClient(
                        f"127.0.0.1:{server.port}",
                        channels=Channel,
                        backoff=Backoff(base=0.05, maximum=0.2),
                    ) as c,
                ):
                    endpoints = c.resolve(AUTHORITY)
                    got = await endpoints.wait_ready(10)
                    assert [e.key for e in got.endpoints] == [("10.0.0.5", 8080)]

                    # The API server goes away with every watch open, and comes back.
                    await first.__aexit__(None, None, None)
                    await eventually(lambda: restarts(server, "pods", "error") > 0, timeout=5)
                    second = kmock.Server(emulator, port=port, server_cls=PromptShutdown)
                    await second.__aenter__()
                    assert second.port == port

                    # Changes made after the restart arrive through the re-established watches.
                    await _call(core.create_namespaced_pod, "default", pod("web-1", "10.0.0.6"))
                    got = await eventually(
                        lambda: len(endpoints.current.endpoints) == 2 and endpoints.current,
                        timeout=10,
                    )
                    assert {e.key for e in got.endpoints} == {
                        ("10.0.0.5", 8080),
                        ("10.0.0.6", 8080),
                    }
                    await _call(core.delete_namespaced_pod, "web-0", "default")
                    got = await eventually(
                        lambda: len(endpoints.current.endpoints) == 1 and endpoints.current,
                        timeout=10,
                    )
                    assert [e.key for e in got.endpoints] == [("10.0.0.6", 8080)]
                    # Every watched resource restarted on the error, not on a resync.
                    for kind in server.kube_source.reflectors:
                        assert restarts(server, kind, "error") >= 1, kind
                    assert restarts(server, "pods", "resync") == 0
                    assert not endpoints.stale
            finally:
                api.close()
                for s in (second, first):
                    if s is not None and s._managed_server is not None:
                        await s.__aexit__(None, None, None)


async def _call(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)
