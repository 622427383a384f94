"""Wiring the data plane together: one :class:`Proxy` with its listeners, and a runnable entry.

The three inputs are small interfaces, so the identity and destination clients plug in
without changes here: a :class:`~proxy.meshtls.CredentialSource` (certificate, key, bundle),
a :class:`~proxy.routes.RouteSource` (services and endpoints) and a
:class:`~proxy.policy.PolicySource` (inbound policy). ``python -m proxy --config FILE`` runs
one proxy from a YAML/JSON file with static routes, policy and PEM files (see README).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.admin import AdminServer
from proxy.errors import ConfigError
from proxy.inbound import Inbound, listener_ports
from proxy.listener import serve
from proxy.meshtls import CredentialSource, MeshCredentials, MeshTls
from proxy.metrics import ProxyMetrics
from proxy.outbound import Outbound
from proxy.policy import (
    Authorization,
    DefaultPolicy,
    InboundPolicy,
    PolicySource,
    Server,
    StaticPolicy,
    parse_networks,
)
from proxy.routes import RouteSource, StaticRoutes
from proxy.settings import DETECT_TIMEOUT, HEAD_TIMEOUT, SHUTDOWN_GRACE, KexPolicy, Listen
from proxy.upstream import Connector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Listen addresses and behaviour; ports 0 pick free ports (tests)."""

    outbound: Listen = Listen("127.0.0.1", 4140)
    inbound: Listen = Listen("0.0.0.0", 4143)
    admin: Listen | None = Listen("127.0.0.1", 4191)
    upstreams: tuple[tuple[Listen, str], ...] = ()  # local listener -> service name
    kex: KexPolicy = KexPolicy.HYBRID_REQUIRED
    app_host: str = "127.0.0.1"
    inbound_default_port: int | None = None
    inbound_ports: frozenset[int] | None = None
    detect_timeout: float = DETECT_TIMEOUT
    head_timeout: float = HEAD_TIMEOUT  # seconds for a started request head to complete
    shutdown_grace: float = SHUTDOWN_GRACE  # what the process's stop gives Proxy.stop
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("detect_timeout", "head_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        grace = self.shutdown_grace
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise ConfigError(f"shutdown_grace must be a number of seconds >= 0, got {grace!r}")


class FileCredentials:
    """Credentials read from PEM files, re-read when a file changes (checked at most every
    ``interval`` seconds of ``clock``), so a renewal on disk applies to new connections."""

    def __init__(
        self,
        identity: str,
        chain: Path,
        key: Path,
        bundle: Path,
        *,
        clock: Callable[[], float],
        interval: float = 1.0,
    ) -> None:
        self.identity = identity
        self.paths = (chain, key, bundle)
        self.clock = clock
        self.interval = interval
        self._checked = float("-inf")
        self._stamp: tuple[int, ...] = ()
        self._value: MeshCredentials | None = None

    def current(self) -> MeshCredentials | None:
        now = self.clock()
        if now - self._checked >= self.interval:
            self._checked = now
            try:
                stamp = tuple(os.stat(p).st_mtime_ns for p in self.paths)
            except FileNotFoundError:
                return self._value  # not issued yet, or mid-rotation: keep what we have
            if stamp != self._stamp:
                self._stamp = stamp  # a refused set is read again only once a file changes
                try:
                    chain, key, bundle = (p.read_bytes() for p in self.paths)
                    self._value = MeshCredentials(self.identity, chain, key, bundle)
                except (OSError, ConfigError) as e:
                    # Half-written or unusable files: keep serving on the last good set, as
                    # the mesh TLS layer does for credentials that do not load.
                    log.error("credential files cannot be used, keeping the last good: %s", e)
        return self._value


class Proxy:
    """One sidecar proxy: outbound, inbound, upstream and admin listeners."""

    def __init__(
        self,
        credentials: CredentialSource,
        routes: RouteSource,
        policy: PolicySource,
        settings: ProxySettings | None = None,
    ) -> None:
        self.settings = settings or ProxySettings()
        self.credentials = credentials
        self.routes = routes
        self.policy = policy
        self.metrics = ProxyMetrics()
        self.tls = MeshTls(credentials, self.settings.kex)
        self.servers: dict[str, asyncio.Server] = {}
        self.outbound: Outbound | None = None
        self.inbound: Inbound | None = None

    def ready(self) -> bool:
        """Linkerd's readiness: there is a certificate to serve with."""
        return self.credentials.current() is not None

    def port(self, name: str) -> int:
        """The bound port of listener ``name`` (outbound, inbound, admin, upstream:<service>)."""
        return int(self.servers[name].sockets[0].getsockname()[1])

    async def start(self) -> None:
        s = self.settings
        connector = Connector(self.tls, self.metrics, direction="outbound")
        self.outbound = out = Outbound(
            self.routes,
            connector,
            self.metrics,
            detect_timeout=s.detect_timeout,
            head_timeout=s.head_timeout,
        )
        self.inbound = inb = Inbound(
            self.tls,
            self.policy,
            self.metrics,
            app_host=s.app_host,
            default_port=s.inbound_default_port,
            allowed_ports=s.inbound_ports,
            detect_timeout=s.detect_timeout,
            head_timeout=s.head_timeout,
        )
        if s.admin is not None:
            admin = AdminServer(self.metrics, self.ready)
            self.servers["admin"] = await admin.start(s.admin.host, s.admin.port)
        self.servers["outbound"] = await serve(
            s.outbound.host, s.outbound.port, out.accept, what="outbound"
        )
        self.servers["inbound"] = await serve(
            s.inbound.host, s.inbound.port, inb.accept, what="inbound"
        )
        for listen, service in s.upstreams:
            listener = out.upstream_listener(service)
            self.servers[f"upstream:{service}"] = await serve(
                listen.host, listen.port, listener.accept, what=f"upstream for {service}"
            )
        bound = [sock.getsockname()[:2] for srv in self.servers.values() for sock in srv.sockets]
        inb.own_ports = listener_ports(bound, s.app_host)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting connections, then (``grace`` > 0) drain: each client connection
        ends once the request it has in progress is answered (which says ``connection:
        close``), an idle one at once, and what is still open after ``grace`` seconds (an
        opaque stream, a request still running) is cut. A process stopping on SIGTERM passes
        ``settings.shutdown_grace``."""
        for server in self.servers.values():
            server.close()
        if grace > 0:
            await self._drain(grace)
        if self.outbound is not None:
            self.outbound.close()
        for pool in (
            self.outbound.pool if self.outbound else None,
            self.inbound.pool if self.inbound else None,
        ):
            if pool is not None:
                pool.close_all()
        for server in self.servers.values():
            try:
                async with asyncio.timeout(2):
                    await server.wait_closed()
            except TimeoutError:
                pass
        self.servers.clear()

    async def _drain(self, grace: float) -> None:
        links = self.metrics.accepted()
        for link in links:
            if not link.closed:
                link.retire()  # an HTTP/1 server closes it now if idle, else after its answer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(not link.closed for link in links):
            await asyncio.sleep(0.02)
        for link in links:
            if not link.closed:
                link.abort()


def _listen(raw: Any, default: Listen) -> Listen:
    if raw is None:
        return default
    if isinstance(raw, int):
        return Listen(default.host, raw)
    return Listen(str(raw.get("host", default.host)), int(raw.get("port", default.port)))


def _seconds(config: Mapping[str, Any], name: str, default: float) -> float:
    raw = config.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return float(raw)


def policy_from_dict(raw: Mapping[str, Any]) -> InboundPolicy:
    """``{"default": "...", "cluster_networks": [...], "servers": [{name, port, authorizations}]}``."""
    try:
        servers = tuple(
            Server(
                s["name"],
                int(s["port"]),
                tuple(
                    Authorization(
                        a["name"],
                        tuple(a.get("identities", ())),
                        parse_networks(a["networks"])
                        if "networks" in a
                        else Authorization.__dataclass_fields__["networks"].default,  # type: ignore[arg-type]
                        bool(a.get("unauthenticated", False)),
                    )
                    for a in s.get("authorizations", ())
                ),
            )
            for s in raw.get("servers", ())
        )
        return InboundPolicy(
            DefaultPolicy(raw.get("default", "all-unauthenticated")),
            servers,
            parse_networks(raw.get("cluster_networks", [])),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"policy is invalid: {e}") from None


def proxy_from_config(config: Mapping[str, Any], base: Path, clock: Callable[[], float]) -> Proxy:
    """Build a :class:`Proxy` from a parsed config file (paths relative to ``base``)."""
    try:
        creds = config["credentials"]
        source = FileCredentials(
            config["identity"],
            base / creds["chain"],
            base / creds["key"],
            base / creds["bundle"],
            clock=clock,
        )
        defaults = ProxySettings()
        inbound = config.get("inbound") or {}
        ports = inbound.get("ports")
        settings = ProxySettings(
            outbound=_listen(config.get("outbound"), defaults.outbound),
            inbound=_listen(inbound, defaults.inbound),
            admin=_listen(config.get("admin"), defaults.admin or Listen("127.0.0.1", 4191)),
            upstreams=tuple(
                (_listen(u, Listen("127.0.0.1", 0)), str(u["service"]))
                for u in config.get("upstreams", ())
            ),
            kex=KexPolicy(config.get("kex", "hybrid-required")),
            inbound_default_port=inbound.get("default_port"),
            inbound_ports=frozenset(int(p) for p in ports) if ports is not None else None,
            detect_timeout=_seconds(config, "detect_timeout", DETECT_TIMEOUT),
            head_timeout=_seconds(config, "head_timeout", HEAD_TIMEOUT),
            shutdown_grace=_seconds(config, "shutdown_grace", SHUTDOWN_GRACE),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"proxy config is invalid: {e!r}") from None
    routes = StaticRoutes.from_dict(config.get("routes") or {})
    policy = StaticPolicy(policy_from_dict(config.get("policy") or {}))
    return Proxy(source, routes, policy, settings)
