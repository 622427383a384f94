"""Identity fixtures: material valid now, and a running plain-gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

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
