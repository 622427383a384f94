"""The proxy fed by the control plane: adapters from the identity and destination clients to
the proxy's three source interfaces, and the metrics they add to the admin endpoint.

- :class:`TrustAnchors` holds the trust bundle: read from the anchors file at start (the
  proxy needs it to trust the control plane at all), then replaced by the destination's
  trust-bundle stream or by changes of the file, whichever the operator chose.
- :class:`IdentityCredentials` is a :class:`~proxy.meshtls.CredentialSource` over an
  :class:`~identity.client.IdentityClient`: None until the first certificate, then one
  :class:`~proxy.meshtls.MeshCredentials` value per (certificate, bundle) pair, so that the
  mesh TLS contexts are rebuilt only when either changes.
- :class:`DestinationRoutes` is a :class:`~proxy.routes.RouteSource`: each service authority
  gets one ``Get`` watch and one outbound policy watch (its routes' timeouts and retries), started on
  first use (or ahead of time with :meth:`prefetch`), and its last-known endpoints and policy
  keep serving while the destination service is away.
- :class:`DestinationPolicy` is a :class:`~proxy.policy.PolicySource` built from one inbound
  policy watch per application port.

Conversions between the destination's values and the proxy's are pure functions here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path

from destination import policy as dpolicy
from destination.client import ClientMetrics, DestinationClient, Watch
from destination.errors import DestinationError
from destination.model import EndpointSet, TrustBundleSnapshot
from destination.resources import DEFAULT_CLUSTER_NETWORKS
from identity.client import IdentityClient
from identity.families import bundle_family, certificate_families
from pki.bundle import TrustBundle
from pki.errors import PKIError
from pki.names import port_number
from proxy.errors import ConfigError
from proxy.meshtls import MeshCredentials
from proxy.metrics import Family, ProxyMetrics
from proxy.policy import (
    ALL_NETWORKS,
    Authorization,
    DefaultPolicy,
    HttpRoute,
    InboundPolicy,
    Network,
    Server,
    parse_networks,
)
from proxy.routes import (
    Endpoint,
    OutboundRule,
    RouteRetry,
    RouteTimeouts,
    Service,
    ServiceProtocol,
)

log = logging.getLogger(__name__)

# Host headers come from the local application; these bound what a misbehaving one can make
# the proxy remember or subscribe to.
MAX_AUTHORITY_CACHE = 4096
MAX_WATCHED_SERVICES = 512
# A service watch no request used for this long (one to two periods) is closed, so that the
# bound above is on services in use: without it, a proxy that had once resolved 512 names
# (typos and removed services included) could never reach another.
WATCH_IDLE_TIMEOUT = 60.0


# --- trust anchors ---------------------------------------------------------------------------


class TrustAnchors:
    """The trust bundle in use: from ``path`` at start, then from the stream or the file.

    ``current()`` re-checks the file's mtime at most every ``interval`` seconds of ``clock``
    when ``watch_file`` is set; a file that stops parsing keeps the last good bundle.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float],
        watch_file: bool = True,
        interval: float = 1.0,
    ) -> None:
        self.path = path
        self.clock = clock
        self.watch_file = watch_file
        self.interval = interval
        try:
            self._stamp = os.stat(path).st_mtime_ns
            self._bundle = TrustBundle.from_pem(path.read_bytes())
        except (OSError, PKIError) as e:
            raise ConfigError(
                f"trust anchors {path}: {getattr(e, 'strerror', None) or e}"
            ) from None
        self._checked = clock()
        self.source = "file"

    def current(self) -> TrustBundle:
        if self.watch_file:
            now = self.clock()
            if now - self._checked >= self.interval:
                self._checked = now
                self._reload()
        return self._bundle

    def _reload(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
            if stamp == self._stamp:
                return
            bundle = TrustBundle.from_pem(self.path.read_bytes())
        except (OSError, PKIError) as e:
            log.warning("keeping the trust bundle in use: %s cannot be read: %s", self.path, e)
            return
        self._stamp = stamp
        self.replace(bundle, "file")

    def replace(self, bundle: TrustBundle, source: str) -> None:
        if bundle.digest != self._bundle.digest:
            log.info("trust bundle %s… from %s now in use", bundle.digest[:16], source)
        self._bundle = bundle
        self.source = source

    async def follow(self, watch: Watch[TrustBundleSnapshot]) -> None:
        """Apply every bundle the destination streams (run as a task until cancelled)."""
        async for snapshot in watch.updates():
            try:
                bundle = TrustBundle.from_pem(snapshot.pem)
            except PKIError as e:
                log.error("ignoring a trust bundle from destination that does not parse: %s", e)
                continue
            self.replace(bundle, "destination")


# --- credentials -----------------------------------------------------------------------------


class IdentityCredentials:
    """The proxy's credentials: the identity client's certificate plus the trust bundle."""

    def __init__(self, client: IdentityClient, anchors: TrustAnchors) -> None:
        self.client = client
        self.anchors = anchors
        self._built: tuple[object, str] | None = None
        self._value: MeshCredentials | None = None

    def current(self) -> MeshCredentials | None:
        credential = self.client.current()
        if credential is None:
            return None
        bundle = self.anchors.current()
        key = (credential, bundle.digest)
        if self._built is None or self._built[0] is not credential or self._built[1] != key[1]:
            self._value = MeshCredentials(
                self.client.config.identity,
                credential.chain_pem(),
                credential.key.to_pem(),
                bundle.pem(),
            )
            self._built = key
        return self._value


# --- routes ----------------------------------------------------------------------------------


def canonical_authority(
    authority: str, namespace: str, cluster_domain: str = "cluster.local"
) -> str | None:
    """The destination lookup name of an HTTP authority, Kubernetes DNS style, or None.

    ``api`` and ``api:8080`` are in ``namespace``; ``api.shop`` and ``api.shop.svc`` name the
    namespace; fully qualified names stay. Port 80 when absent. IP addresses and names outside
    the cluster domain have no service to resolve (None).
    """
    text = authority.strip().lower().rstrip(".")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, "80"
    host = host.rstrip(".")
    number = port_number(port)
    if number is None or not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    suffix = f".svc.{cluster_domain}"
    labels = host.split(".")
    if host.endswith(suffix):
        fqdn = host
    elif len(labels) == 1:
        fqdn = f"{host}.{namespace}{suffix}"
    elif len(labels) == 2:
        fqdn = f"{host}{suffix}"
    elif len(labels) == 3 and labels[2] == "svc":
        fqdn = f"{host}.{cluster_domain}"
    else:
        return None
    return f"{fqdn}:{number}"


def _seconds(value: timedelta | None) -> float | None:
    return value.total_seconds() if value is not None and value > timedelta(0) else None


MAX_RETRIES = 10  # a route's retry limit beyond this is taken as this


def retry_of(retry: dpolicy.Retry | None) -> RouteRetry | None:
    """The proxy's view of a route's retry policy (the limit capped at MAX_RETRIES)."""
    if retry is None or retry.max_retries <= 0:
        return None  # nothing to send again
    low, high = sorted((retry.min_backoff.total_seconds(), retry.max_backoff.total_seconds()))
    return RouteRetry(
        min(max(retry.max_retries, 0), MAX_RETRIES),
        retry.status_ranges,
        _seconds(retry.timeout),
        max(low, 0.0),
        max(high, 0.0),
        min(max(retry.jitter_ratio, 0.0), 10.0),
        retry.max_request_bytes,
    )


def rules_of(policy: dpolicy.OutboundPolicy | None) -> tuple[OutboundRule, ...]:
    """The outbound rules of a service's policy, for their timeouts and retries: none at all
    when no rule has either (requests are then not matched), else every rule, so that a rule
    without them still wins the requests it matches best."""
    if policy is None:
        return ()
    rules = tuple(
        OutboundRule(
            f"{route.ref.kind} {route.ref.namespace + '/' if route.ref.namespace else ''}"
            f"{route.ref.name}",
            rule.matches,
            RouteTimeouts(_seconds(rule.timeouts.request), _seconds(rule.timeouts.response)),
            retry_of(rule.retry),
        )
        for route in policy.routes
        for rule in route.rules
    )
    if not any(r.limits for r in rules):
        return ()
    return rules


def service_of(endpoints: EndpointSet, policy: dpolicy.OutboundPolicy | None = None) -> Service:
    """The proxy's view of a resolved service (opaque when every endpoint is opaque), with
    the rules of its outbound policy when known."""
    eps = []
    for e in endpoints.endpoints:
        if e.identity is None:
            eps.append(Endpoint(e.address, e.port))
        else:
            # Without an opaque-transport port the peer proxy listens on the target itself.
            eps.append(Endpoint(e.address, e.port, e.identity, e.opaque_inbound_port or e.port))
    opaque = bool(endpoints.endpoints) and all(
        e.protocol_hint == "opaque" for e in endpoints.endpoints
    )
    return Service(
        endpoints.authority,
        tuple(eps),
        ServiceProtocol.OPAQUE if opaque else ServiceProtocol.HTTP1,
        (endpoints.authority,),
        () if opaque else rules_of(policy),
    )


class DestinationRoutes:
    """Services by authority, each kept current by its own destination watch."""

    def __init__(
        self,
        client: DestinationClient,
        namespace: str,
        cluster_domain: str = "cluster.local",
        first_answer_timeout: float = 3.0,
        idle_timeout: float = WATCH_IDLE_TIMEOUT,
    ) -> None:
        self.client = client
        self.first_answer_timeout = first_answer_timeout
        self.idle_timeout = idle_timeout
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self._names: dict[str, str | None] = {}
        self._watches: dict[str, Watch[EndpointSet]] = {}
        self._policies: dict[str, Watch[dpolicy.OutboundPolicy]] = {}
        # name -> (the endpoints and policy it was built from, the service)
        self._services: dict[str, tuple[EndpointSet, dpolicy.OutboundPolicy | None, Service]] = {}
        self._used: set[str] = set()  # names looked up since the last sweep
        self._pinned: set[str] = set()  # prefetched (upstream listeners): never idle
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _canonical(self, authority: str) -> str | None:
        known = self._names.get(authority, "")
        if known != "":
            return known
        if len(self._names) >= MAX_AUTHORITY_CACHE:
            self._names.clear()
        name = self._names[authority] = canonical_authority(
            authority, self.namespace, self.cluster_domain
        )
        return name

    def watch(self, authority: str) -> Watch[EndpointSet] | None:
        """The watch of ``authority``, started on first use (None when it names no service)."""
        name = self._canonical(authority)
        if name is None:
            return None
        watch = self._watches.get(name)
        if watch is None:
            if len(self._watches) >= MAX_WATCHED_SERVICES:
                log.warning(
                    "not resolving %s: %d services watched already", name, len(self._watches)
                )
                return None
            watch = self._watches[name] = self.client.resolve(name)
            self._policies[name] = self.client.outbound_policy(name)
            if self._sweeper is None:
                loop = asyncio.get_running_loop()
                self._sweeper = loop.call_later(self.idle_timeout, self._sweep)
        self._used.add(name)
        return watch

    def _sweep(self) -> None:
        """Close the watches no lookup used since the last sweep (prefetched ones stay)."""
        self._sweeper = None
        idle = [n for n in self._watches if n not in self._used and n not in self._pinned]
        self._used.clear()
        for name in idle:
            self._services.pop(name, None)
            for closing in (self._watches.pop(name), self._policies.pop(name, None)):
                if closing is not None:
                    task = asyncio.ensure_future(self.client.forget(closing))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
        if idle:
            log.info("closed %d service watch(es) idle for %gs", len(idle), self.idle_timeout)
        if self._watches:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle_timeout, self._sweep)

    async def prefetch(self, authorities: Iterable[str], timeout: float) -> list[str]:
        """Start watches and wait up to ``timeout`` for their first answers; returns the
        authorities still unresolved (they keep resolving in the background)."""
        watches = {a: self.watch(a) for a in authorities}
        pending = [a for a, w in watches.items() if w is None]
        self._pinned.update(n for n in map(self._canonical, authorities) if n is not None)

        async def first(authority: str, watch: Watch[EndpointSet]) -> None:
            policy = self._policy_wait(authority, timeout)
            try:
                await watch.wait_ready(timeout)
            except (TimeoutError, DestinationError) as e:
                log.warning("service %s not resolved yet: %s", authority, e)
                pending.append(authority)
            await policy

        await asyncio.gather(*(first(a, w) for a, w in watches.items() if w is not None))
        return pending

    def resolving(self, authority: str) -> Awaitable[None] | None:
        """For an authority without an answer yet: a wait (at most ``first_answer_timeout``)
        for destination's first answers, endpoints and outbound policy side by side, so the
        first request is neither refused while the watch starts nor sent without its route's
        timeouts and retries. None when there is nothing to wait for."""
        watch = self.watch(authority)
        if watch is None or watch.current is not None or watch.done:
            return None
        return self._first_answer(authority, watch)

    async def _first_answer(self, authority: str, watch: Watch[EndpointSet]) -> None:
        policy = self._policy_wait(authority, self.first_answer_timeout)
        with contextlib.suppress(TimeoutError, DestinationError):
            await watch.wait_ready(self.first_answer_timeout)
        await policy

    def _policy_wait(self, authority: str, timeout: float) -> asyncio.Future[None]:
        """The first answer of ``authority``'s outbound policy watch, at most ``timeout``
        (started now, so that it runs beside the endpoints' wait)."""

        async def wait(policy: Watch[dpolicy.OutboundPolicy]) -> None:
            with contextlib.suppress(TimeoutError, DestinationError):
                await policy.wait_ready(timeout)

        name = self._canonical(authority)
        policy = self._policies.get(name) if name is not None else None
        if policy is None or policy.current is not None or policy.done:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return asyncio.ensure_future(wait(policy))

    def by_authority(self, authority: str) -> Service | None:
        watch = self.watch(authority)
        if watch is None:
            return None
        current = watch.current
        if current is None or not current.exists:
            return None
        name = current.authority
        policy_watch = self._policies.get(name)
        policy = policy_watch.current if policy_watch is not None else None
        cached = self._services.get(name)
        if cached is not None and cached[0] is current and cached[1] is policy:
            return cached[2]
        svc = service_of(current, policy)
        self._services[name] = (current, policy, svc)
        return svc

    def by_name(self, name: str) -> Service | None:
        return self.by_authority(name)


# --- inbound policy --------------------------------------------------------------------------


def networks_of(networks: Iterable[dpolicy.Network]) -> tuple[Network, ...]:
    """CIDRs minus their exceptions, as a plain tuple of networks."""
    out: list[Network] = []
    for net in networks:
        parts: list[Network] = [net.cidr]
        for excluded in net.exceptions:
            kept: list[Network] = []
            for part in parts:
                if excluded.version != part.version or not excluded.overlaps(part):
                    kept.append(part)
                elif not part.subnet_of(excluded):  # type: ignore[arg-type]
                    kept.extend(part.address_exclude(excluded))  # type: ignore[arg-type]
            parts = kept
        out.extend(parts)
    return tuple(out)


def authorization_of(a: dpolicy.Authorization) -> Authorization:
    name = a.ref.name if a.ref.kind != "default" else f"default:{a.ref.name}"
    networks = networks_of(a.networks)
    kind = a.authentication.kind
    if kind is dpolicy.AuthKind.UNAUTHENTICATED:
        return Authorization(name, (), networks, unauthenticated=True)
    if kind is dpolicy.AuthKind.TLS:
        # Mesh clients always present a certificate: "any identity" is the same set here.
        return Authorization(name, ("*",), networks)
    return Authorization(name, a.authentication.patterns, networks)


def server_of(p: dpolicy.InboundPolicy) -> Server:
    """The proxy's policy for one port from the destination's answer: the server's
    authorizations and its HTTPRoutes with theirs. In audit mode everything is admitted
    (and flagged), routes included."""
    name = p.server.name if p.server.kind != "default" else f"default:{p.server.name}"
    if p.audit:
        audit = Authorization(f"{name}:audit", (), ALL_NETWORKS, unauthenticated=True)
        return Server(name, p.port, (audit,))
    authz = tuple(authorization_of(a) for a in p.authorizations)
    routes = tuple(
        HttpRoute(
            r.ref.name,
            r.matches,
            tuple(authorization_of(a) for a in r.authorizations),
        )
        for r in p.routes
    )
    return Server(name, p.port, authz, routes)


class DestinationPolicy:
    """The inbound policy of the application's ports, from one watch per port.

    Ports without an answer yet, and ports not listed, get ``default``.
    """

    def __init__(
        self,
        client: DestinationClient,
        ports: Iterable[int],
        default: DefaultPolicy = DefaultPolicy.ALL_UNAUTHENTICATED,
        cluster_networks: tuple[Network, ...] = (),
    ) -> None:
        self.default = default
        # Linkerd's clusterNetworks default when none are given (cluster-* defaults need them).
        self.cluster_networks = cluster_networks or parse_networks(DEFAULT_CLUSTER_NETWORKS)
        self._watches = {port: client.inbound_policy(port) for port in sorted(set(ports))}
        self._seen: tuple[object, ...] = ()
        self._policy = InboundPolicy(default, (), self.cluster_networks)

    def current(self) -> InboundPolicy:
        seen = tuple(w.current for w in self._watches.values())
        # Identity, not equality: a watch replaces its value only when a message arrives, and
        # this runs once per inbound request.
        if len(seen) != len(self._seen) or any(
            a is not b for a, b in zip(seen, self._seen, strict=True)
        ):
            servers = tuple(server_of(p) for p in seen if p is not None)
            self._policy = InboundPolicy(self.default, servers, self.cluster_networks)
            self._seen = seen
        return self._policy

    async def wait_ready(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` for every port's first answer; returns the ports without one."""
        missing: list[int] = []

        async def first(port: int, watch: Watch[dpolicy.InboundPolicy]) -> None:
            try:
                await watch.wait_ready(timeout)
            except (TimeoutError, DestinationError) as e:  # the default policy applies meanwhile
                log.warning("inbound policy of port %d not known yet: %s", port, e)
                missing.append(port)

        await asyncio.gather(*(first(p, w) for p, w in self._watches.items()))
        return sorted(missing)


# --- metrics ---------------------------------------------------------------------------------


def control_plane_handshakes() -> Family:
    """TLS handshakes with the identity and destination services (the proxy's own gRPC
    channels report them; see :data:`proxy.rpc.HandshakeObserver`)."""
    return Family(
        "trustmesh_proxy_control_plane_tls_handshakes_total",
        "counter",
        "TLS handshakes with the control plane by server name, negotiated group and result.",
        ("server", "group", "result"),
    )


class ControlMetrics(ProxyMetrics):
    """The proxy's metrics plus identity (Linkerd's names), trust-bundle and destination-client
    families, rendered together on the admin ``/metrics`` (without prometheus_client, which
    the proxy does not load)."""

    def __init__(
        self,
        credentials: IdentityCredentials,
        destination: ClientMetrics,
        handshakes: Family | None = None,
    ) -> None:
        super().__init__()
        self._credentials = credentials
        self._destination = destination
        self.control_plane_handshakes = (
            control_plane_handshakes() if handshakes is None else handshakes
        )

    def render(self) -> str:
        return super().render() + "\n".join(self.control_lines()) + "\n"

    def control_lines(self) -> Iterator[str]:
        creds = self._credentials
        client = creds.client
        expiration, refreshed = client.expiration, client.last_refresh
        yield from _gauge(
            "identity_cert_expiration_timestamp_seconds",
            "NotAfter of the workload certificate in use (0 before the first).",
            expiration.timestamp() if expiration is not None else 0.0,
        )
        yield from _gauge(
            "identity_cert_refresh_timestamp_seconds",
            "When the certificate was last refreshed (0 before the first).",
            refreshed.timestamp() if refreshed is not None else 0.0,
        )
        refreshes = Family(
            "identity_cert_refreshes_total", "counter", "Certify attempts by result.", ("result",)
        )
        for result, count in client.refreshes.items():
            refreshes.set((result,), count)
        yield from refreshes.lines()
        anchors = creds.anchors
        families = [
            bundle_family(
                anchors.current().digest, anchors.source, "trustmesh_proxy_trust_bundle_info"
            )
        ]
        credential = client.current()
        if credential is not None:
            families += certificate_families([("workload", credential.certificate)], "proxy")
        for family in families:
            gauge = Family(family.name, "gauge", family.help, family.labels)
            for labels, value in family.samples:
                gauge.set(labels, value)
            yield from gauge.lines()
        ident = Family(
            "trustmesh_proxy_identity_info",
            "gauge",
            "The identity this proxy certifies as; ready is 1 once it holds a certificate.",
            ("identity", "ready"),
        )
        ident.set((client.config.identity, "1" if client.ready else "0"), 1)
        yield from ident.lines()
        yield from self.control_plane_handshakes.lines()
        yield from self._destination_lines()

    def _destination_lines(self) -> Iterator[str]:
        d = self._destination
        yield from _gauge(
            "trustmesh_destination_client_control_plane_up",
            "1 while every destination stream is live; 0 while serving last-known state.",
            d.up,
        )
        yield from _gauge(
            "trustmesh_destination_client_stale_streams",
            "Streams currently serving their last-known state.",
            d.stale,
        )
        for name, help_text, counts in (
            ("reconnects", "Stream reconnect attempts, by stream kind.", d.reconnects),
            ("updates", "Messages received, by stream kind.", d.updates),
        ):
            family = Family(
                f"trustmesh_destination_client_{name}_total", "counter", help_text, ("stream",)
            )
            for kind, count in counts.items():
                family.set((kind,), count)
            yield from family.lines()
        rebuilds = Family(
            "trustmesh_destination_client_channel_rebuilds_total",
            "counter",
            "Channels to the destination service rebuilt because the trust bundle changed.",
            (),
        )
        rebuilds.set((), d.channel_rebuilds)
        yield from rebuilds.lines()


def _gauge(name: str, help_text: str, value: float) -> Iterator[str]:
    family = Family(name, "gauge", help_text, ())
    family.set((), value)
    return iter(family.lines())


__all__ = [
    "ControlMetrics",
    "DestinationPolicy",
    "DestinationRoutes",
    "IdentityCredentials",
    "TrustAnchors",
    "authorization_of",
    "canonical_authority",
    "networks_of",
    "server_of",
    "service_of",
]
