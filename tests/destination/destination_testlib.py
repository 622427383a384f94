"""Shared helpers of the destination tests (importable; conftest holds the fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from destination.client import Backoff, DestinationClient
from destination.paths import WorkloadRef
from destination.service import DestinationServer, ServeOptions
from pki.names import control_plane_identity
from pki.store import FileStore
from proxy.rpc import Channel

# The TLS name of the destination service's certificate (default namespace and trust domain).
DESTINATION_NAME = control_plane_identity("destination").dns_name

WEB = """\
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: default, labels: {app: web}}
spec: {serviceAccount: web, address: 127.0.0.1, inboundProxyPort: 14143}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {selector: {app: web}, ports: [{port: 8080, targetPort: 18080}]}
"""

WEB_1 = """\
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {serviceAccount: web, address: 127.0.0.2, inboundProxyPort: 14144}
"""


def quick_client(port: int, workload: WorkloadRef | None = None) -> DestinationClient:
    """A plaintext client of 127.0.0.1:``port`` that reconnects within 0.2 s, reproducibly."""
    return DestinationClient(
        f"127.0.0.1:{port}",
        channels=Channel,
        workload=workload,
        backoff=Backoff(base=0.05, maximum=0.2),
        rng=random.Random(1),
    )


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` until it returns a truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def tls_server(
    store: FileStore, mesh_file: Path, listen: str = "127.0.0.1:0"
) -> AsyncIterator[DestinationServer]:
    """A destination server over TLS, its certificate issued by ``store``'s current issuer at
    start (a restart on the same ``listen`` address picks up a new issuer)."""
    server = DestinationServer(
        ServeOptions(
            listen=listen,
            admin_listen="127.0.0.1:0",
            mesh_file=mesh_file,
            store=store.root,
            tls=True,
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
