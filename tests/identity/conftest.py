"""Identity fixtures: material valid now, and a running plain-gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from identity_testkit import Env, make_env

from identity.server import IdentityServer, ServerConfig
from identity.sources import StoreSource
from pki.certs import utcnow


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """Material valid at the real current time (servers read the real clock)."""
    return make_env(tmp_path / "store", utcnow())


@pytest.fixture
async def server(env: Env) -> AsyncIterator[IdentityServer]:
    """A plain-gRPC identity server on 127.0.0.1:0 over the env's store."""
    srv = IdentityServer(
        ServerConfig(reload_interval=0.05),
        StoreSource(env.store),
        env.validator(utcnow),
        clock=utcnow,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


class TokenReviewEmulator(kmock.KubernetesEmulator):
    """kmock stores every created object; TokenReviews are answered, never stored (else the
    second review of the same object would be a 409 Conflict)."""

    async def _handle(self, request: Any) -> Any:
        if getattr(request.resource, "plural", None) == "tokenreviews":
            return await kmock.KubernetesScaffold._handle(self, request)
        return await super()._handle(request)


@pytest.fixture
async def k8s() -> AsyncIterator[tuple[TokenReviewEmulator, Any]]:
    """kmock (a real HTTP server speaking the Kubernetes API) and an official-client ApiClient."""
    from kubernetes import client

    async with TokenReviewEmulator() as emulator, kmock.Server(emulator) as server:
        for resource in (
            "v1/secrets",
            "v1/configmaps",
            "v1/events",
            "authentication.k8s.io/v1/tokenreviews",
        ):
            emulator.resources[resource] = {}
        api = client.ApiClient(client.Configuration(host=str(server.url).rstrip("/")))
        try:
            yield emulator, api
        finally:
            api.close()
