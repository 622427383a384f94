"""The destination service assembled: a source, the hub, the gRPC server and the admin port.

:class:`DestinationServer` is what ``trustmesh destination serve`` runs and what tests start on
port 0. It refuses to start on an invalid mesh file; after that, an invalid change is refused
and the last good state stays served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from destination.admin import AdminServer
from destination.bundles import (
    BundleProvider,
    file_provider,
    publish_bundle,
    refresh_bundle,
    store_provider,
)
from destination.errors import StartupError
from destination.hub import Hub
from destination.meshfile import MeshFileSource
from destination.metrics import ServiceMetrics
from destination.resources import ClusterState, MeshSettings
from destination.server import add_services
from pki.names import split_host_port

log = logging.getLogger(__name__)

MAX_PENDING_CALLS = 16_384  # streams opened and not yet handled
# Every request of the Destination and policy APIs is a name, a port and a context token:
# far below this. A bigger one is refused (RESOURCE_EXHAUSTED) before it is parsed.
MAX_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServeOptions:
    listen: str = "127.0.0.1:8086"
    admin_listen: str = "127.0.0.1:9996"
    settings: MeshSettings = field(default_factory=MeshSettings)
    mesh_file: Path | None = None
    kubernetes: bool = False
    store: Path | None = None  # credential store: TLS certificate and trust bundle
    tls: bool = False
    trust_bundle: Path | None = None  # PEM file of anchors (overrides the store's bundle)
    poll_interval: float = 1.0
    resync: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if (self.mesh_file is None) == (not self.kubernetes):
            raise ValueError("choose exactly one source: a mesh file or Kubernetes")
        if self.tls and self.store is None:
            raise ValueError("--tls needs --store DIR to issue the server certificate")


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every IPv4 address) as (host, port)."""
    parts = split_host_port(text, lowest=0)
    if parts is None:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return parts[0] or "0.0.0.0", parts[1]


def _bind_failure(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, as the OS says it (grpc's error does not)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return str(e.strerror)
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as e:
                return str(e.strerror)
    return "the gRPC server could not bind it"


class DestinationServer:
    """Runs until :meth:`stop`; ``port`` and ``admin_port`` are the bound ports."""

    def __init__(self, options: ServeOptions, *, kube_api: Any = None) -> None:
        self.options = options
        self.metrics = ServiceMetrics()
        self.hub = Hub()
        self.port = 0
        self.admin_port = 0
        self._kube_api = kube_api
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._admin = AdminServer(self.metrics.registry, self.readiness)
        self.mesh_source: MeshFileSource | None = None
        self.kube_source: Any = None
        self.trust_roots: Any = None

    def readiness(self) -> tuple[bool, str]:
        if self._grpc is None:
            return False, "gRPC server not started"
        if self.hub.state is None:
            return False, "no cluster state loaded yet"
        return True, ""

    def publish(self, state: ClusterState) -> None:
        changed = self.hub.set_state(state)
        self.metrics.generation.set(self.hub.generation)
        log.debug("state %d applied; %d topics changed", self.hub.generation, changed)

    def _bundle_provider(self) -> tuple[BundleProvider | None, Path | None]:
        o = self.options
        if o.trust_bundle is not None:
            return file_provider(o.trust_bundle), o.trust_bundle
        if o.store is not None:
            return store_provider(o.store), o.store / "current"
        return None, None

    async def start(self) -> None:
        o = self.options
        if o.mesh_file is not None:
            self.mesh_source = MeshFileSource(
                o.mesh_file,
                self.publish,
                lambda result, error: self.metrics.reload("mesh-file", result),
                poll_interval=o.poll_interval,
            )
            self.publish(self.mesh_source.load())  # an invalid file refuses to start
            self.metrics.reload("mesh-file", "applied")
            self._spawn(self.mesh_source.run(self._stop))
        else:
            from destination.kubernetes import KubernetesSource

            self.kube_source = KubernetesSource(
                self._kube_api, self.publish, self.metrics, resync=o.resync
            )
            self._spawn(self.kube_source.run(self._stop))
        provider, watched = self._bundle_provider()
        if provider is not None:
            publish_bundle(provider, self.hub, self.metrics)
            self._spawn(refresh_bundle(provider, watched, self.hub, self.metrics, self._stop))
        elif o.kubernetes:  # no --trust-bundle/--store: the trust-roots ConfigMap, watched
            from destination.bundles import TrustRootsWatch

            self.trust_roots = TrustRootsWatch(
                self._kube_api,
                o.settings.control_plane_namespace,
                self.hub,
                self.metrics,
                resync=o.resync,
            )
            self._spawn(self.trust_roots.run(self._stop))
        server = grpc.aio.server(
            options=[
                # grpc sets SO_REUSEPORT by default: a second server on a port already in use
                # would then quietly take a share of its connections instead of failing.
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", 10_000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 3_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                # grpc cancels calls that wait for a handler beyond 1,000 (soft) / 3,000 (hard)
                # per server: after a restart, every proxy reopens its streams at once, and of
                # 2,000 Get streams opened together about 150 were CANCELLED (4,000: a third).
                # Each waiting call holds at most one request, bounded below.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ]
        )
        add_services(server, self.hub, o.settings, self.metrics)
        host, port = listen_address(o.listen)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if o.tls:
                from destination.tls import server_credentials

                assert o.store is not None
                creds = server_credentials(o.store, o.settings)
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address ...", without the reason
            await self.stop(0)
            raise StartupError(
                f"cannot listen on {o.listen}: {_bind_failure(host, port)}"
            ) from None
        await server.start()
        self._grpc = server
        admin_host, admin_port = listen_address(o.admin_listen)
        try:
            self.admin_port = await self._admin.start(admin_host, admin_port)
        except OSError as e:
            await self.stop(0)
            reason = os.strerror(e.errno) if e.errno else str(e)  # asyncio rewords strerror
            raise StartupError(f"cannot listen on {o.admin_listen}: {reason}") from None
        log.info("destination service on %s:%d (admin %d)", host, self.port, self.admin_port)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_crash)
        self._tasks.append(task)

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self, grace: float = 0.5) -> None:
        self._stop.set()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self._admin.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> DestinationServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
