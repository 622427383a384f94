"""kmock (the Kubernetes API test double: a real HTTP server) set up for the destination tests.

Two quirks of kmock 0.8 are worked around here, and only here:

- its path parser reads ``/api/v1/namespaces`` as "namespace <missing>" and answers 500, so
  the cluster-scoped Namespace resource cannot be listed or watched; :func:`namespace_paths`
  wraps the parser so that ``/api/v1/namespaces[/<name>]`` means the ``namespaces`` resource;
- leaving a ``kmock.Server`` waits for open watch streams to end on their own (aiohttp's
  60 s shutdown grace), so "the API server stops" would take as long as the client's read
  timeout; :class:`PromptShutdown` cuts the grace to 0.1 s, so open watches are dropped the
  way a restarting kube-apiserver drops them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp.test_utils
import kmock
from kmock._internal import parsing
from kubernetes import client

from destination.kubernetes import KINDS, NAMESPACES


class PromptShutdown(aiohttp.test_utils.RawTestServer):
    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> Any:
        runner = await super()._make_runner(debug, **kwargs)
        runner._shutdown_timeout = 0.1
        return runner


@contextlib.contextmanager
def namespace_paths() -> Iterator[None]:
    original = parsing.parse_path

    def parse_path(path: str) -> Any:
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            name = parts[3] if len(parts) == 4 else None
            return parsing.ParsedPath("", "v1", "namespaces", None, name)
        return original(path)

    parsing.parse_path = parse_path
    try:
        yield
    finally:
        parsing.parse_path = original


def declare_resources(emulator: Any, extra: tuple[str, ...] = ()) -> None:
    """Make the emulator serve every resource the source watches (empty until created)."""
    for kind in (*KINDS, NAMESPACES):
        emulator.resources[f"{kind.api_version}/{kind.plural}"] = {}
    for name in extra:
        emulator.resources[name] = {}


def api_for(server: kmock.Server) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.port}"))


@contextlib.asynccontextmanager
async def emulated_api() -> AsyncIterator[tuple[Any, kmock.Server, client.ApiClient]]:
    """An emulator serving the watched resources (and ConfigMaps), its server and a client."""
    with namespace_paths():
        async with kmock.KubernetesEmulator() as emulator:
            declare_resources(emulator, ("v1/configmaps",))
            async with kmock.Server(emulator, server_cls=PromptShutdown) as server:
                api = api_for(server)
                try:
                    yield emulator, server, api
                finally:
                    api.close()


def pod(name: str, ip: str, sa: str = "web", namespace: str = "default") -> dict[str, Any]:
    """A running meshed Pod labelled app=web, with an HTTP port 8080 and opaque port 5432."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "web", "linkerd.io/control-plane-ns": "trustmesh"},
            "annotations": {"config.linkerd.io/opaque-ports": "5432"},
        },
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                {
                    "name": "linkerd-proxy",
                    "ports": [{"name": "linkerd-proxy", "containerPort": 4143}],
                },
            ],
        },
        "status": {"podIP": ip, "phase": "Running"},
    }


def selector_service(name: str = "web", namespace: str = "default") -> dict[str, Any]:
    """A Service selecting app=web, port 80 to the pods' named port ``http``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
