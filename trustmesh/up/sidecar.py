"""One sidecar proxy fed by the control plane (what ``trustmesh proxy run`` executes).

Order of start, as Linkerd's proxy: the admin server first (``/ready`` answers 503), then the
first certificate from the identity service, then (bounded waits) the inbound policy of the
application's ports and the upstream services' endpoints, and only then the outbound, inbound
and upstream listeners: before its certificate the proxy serves nothing. ``/ready`` turns 200
once the listeners are up. Renewal, policy and endpoint updates continue in the background;
with the destination service away the last-known state keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from destination.client import ClientMetrics, DestinationClient
from destination.paths import WorkloadRef
from identity.client import IdentityClient, IdentityClientConfig, IdentityClientError
from pki.certs import utcnow
from proxy.admin import AdminServer
from proxy.app import Proxy, ProxySettings
from proxy.control import (
    ControlMetrics,
    DestinationPolicy,
    DestinationRoutes,
    IdentityCredentials,
    TrustAnchors,
    control_plane_handshakes,
)
from proxy.listener import FullCollections, tune_gc
from proxy.rpc import channel_factory
from trustmesh.up.sidecar_config import SidecarConfig

log = logging.getLogger(__name__)


def token_reader(path: Path) -> Callable[[], bytes]:
    """Reads the workload token on every Certify, so a rotated token file is picked up."""

    def read() -> bytes:
        try:
            token = path.read_bytes().strip()
        except OSError as e:
            raise IdentityClientError(f"cannot read the token file {path}: {e.strerror}") from None
        if not token:
            raise IdentityClientError(f"the token file {path} is empty")
        return token

    return read


class Sidecar:
    """The assembled proxy with its control-plane clients."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = c = config
        loop = asyncio.get_running_loop()
        self.anchors = TrustAnchors(
            c.trust_anchors, clock=loop.time, watch_file=c.bundle_from == "file"
        )
        client_metrics = ClientMetrics()
        # The control plane's connections get the key exchange the mesh's do.
        handshakes = control_plane_handshakes()
        channels = channel_factory(
            c.kex,
            on_handshake=lambda server, group, result: handshakes.inc((server, group, result)),
        )
        self.destination = DestinationClient(
            c.destination_addr,
            channels=channels,
            workload=WorkloadRef(c.namespace, c.workload),
            # The channel follows the bundle in use, so an anchor rotation that re-issues the
            # control plane's certificates under a new anchor does not lock the proxy out.
            trust_bundle=self.anchors.current if c.destination_name is not None else None,
            server_name=c.destination_name,
            metrics=client_metrics,
        )
        self.identity = IdentityClient(
            IdentityClientConfig(c.identity_addr, c.identity, server_name=c.identity_name),
            token_reader(c.token_file),
            self.anchors.current,
            channels=channels,
            clock=utcnow,
        )
        self.credentials = IdentityCredentials(self.identity, self.anchors)
        self.routes = DestinationRoutes(self.destination, c.namespace, c.cluster_domain)
        self.policy = DestinationPolicy(self.destination, c.app_ports, c.default_inbound_policy)
        settings = ProxySettings(
            outbound=c.outbound,
            inbound=c.inbound,
            admin=None,  # ours, started before the certificate so /ready can say "not yet"
            upstreams=c.upstreams,
            kex=c.kex,
            app_host=c.app_host,
            inbound_default_port=c.app_ports[0] if c.app_ports else None,
            inbound_ports=frozenset(c.app_ports) if c.app_ports else None,
            detect_timeout=c.detect_timeout,
            head_timeout=c.head_timeout,
            shutdown_grace=c.shutdown_grace,
        )
        self.proxy = Proxy(self.credentials, self.routes, self.policy, settings)
        self.metrics = ControlMetrics(self.credentials, client_metrics, handshakes)
        self.proxy.metrics = self.metrics  # before start(): every listener counts into it
        self.serving = False
        self.ports: dict[str, int] = {}
        self._admin: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._collections: FullCollections | None = None  # tune_gc's, once serving

    def _certificate_pem(self) -> bytes | None:
        credential = self.identity.current()
        return credential.chain_pem() if credential is not None else None

    async def start(self, stop: asyncio.Event) -> bool:
        """Start; returns False when ``stop`` was set before the proxy could serve."""
        c = self.config
        admin = AdminServer(self.metrics, lambda: self.serving, self._certificate_pem)
        self._admin = await admin.start(c.admin.host, c.admin.port)
        self.ports["admin"] = int(self._admin.sockets[0].getsockname()[1])
        self._tasks.append(asyncio.create_task(self.identity.run()))
        if c.bundle_from == "destination":
            watch = self.destination.trust_bundle(self.anchors.current().digest)
            self._tasks.append(asyncio.create_task(self.anchors.follow(watch)))
        log.info("waiting for the first certificate for %s", c.identity)
        if not await _first(self._certified(), stop):
            return False
        missing_ports, unresolved = await asyncio.gather(
            self.policy.wait_ready(c.startup_wait),
            self.routes.prefetch([service for _, service in c.upstreams], c.startup_wait),
        )
        if missing_ports:
            log.warning(
                "serving ports %s on the default policy until destination answers", missing_ports
            )
        if unresolved:
            log.warning("upstream services not resolved yet: %s", ", ".join(unresolved))
        await self.proxy.start()
        # Startup objects frozen, fewer young collections (~5 µs/request/hop), and a full
        # collection every minute.
        self._collections = tune_gc()
        self.ports.update({name: self.proxy.port(name) for name in self.proxy.servers})
        self.serving = True
        log.info("proxy %s serving: %s", c.identity, self.ports)
        return True

    async def _certified(self) -> None:
        while True:
            try:
                await self.identity.wait_ready(timeout=30.0)
                return
            except TimeoutError:
                log.warning(
                    "still no certificate for %s after 30s: %s",
                    self.config.identity,
                    self.identity.last_error or "no answer yet",
                )

    async def stop(self) -> None:
        serving, self.serving = self.serving, False
        if self._collections is not None:
            self._collections.cancel()
        # Serving: drain the connections clients have open (identity and destination stay
        # up meanwhile); stopped while still waiting for a certificate, there are none.
        await self.proxy.stop(self.proxy.settings.shutdown_grace if serving else 0.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.destination.close()
        if self._admin is not None:
            self._admin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._admin.wait_closed()


async def _first(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first; True when ``work`` finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        if pending not in done:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    return task in done


async def run_sidecar(
    config: SidecarConfig, stop: asyncio.Event, announce: Callable[[dict[str, int]], None]
) -> None:
    """Run one sidecar until ``stop`` is set; ``announce`` gets the bound ports once serving."""
    sidecar = Sidecar(config)
    try:
        if await sidecar.start(stop):
            announce(dict(sidecar.ports))
            await stop.wait()
    finally:
        await sidecar.stop()
