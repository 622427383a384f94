"""The outbound side: from the local application to the mesh.

On the outbound port, HTTP/1 requests are routed by authority (``Host``) to a service, a
fresh endpoint is picked for each request with peak-EWMA P2C, and the request rides a pooled
mesh-TLS connection to that endpoint's proxy. Other protocols on that port have no target
without ``SO_ORIGINAL_DST`` and are closed. An *upstream listener* is a local port mapped to
one service: opaque services are relayed as TCP (one endpoint choice per connection), HTTP
services are forwarded per request whatever the ``Host``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from urllib.parse import parse_qsl

from pki.errors import quoted
from proxy.balancer import PeakEwmaBalancer
from proxy.detect import Detected, Proto
from proxy.errors import ProxyError, UnknownRoute, UpstreamError
from proxy.http1 import Exchange, Http1Server, LingeringClose
from proxy.http1_exchange import request_headers, request_path
from proxy.link import Link, NullSink
from proxy.listener import Detector
from proxy.lograte import PeerLog
from proxy.metrics import HttpSeries, ProxyMetrics
from proxy.routes import Endpoint, OutboundRule, RouteSource, Service, ServiceProtocol
from proxy.settings import DETECT_TIMEOUT, HEAD_TIMEOUT
from proxy.tcp import Relay
from proxy.transport_header import SessionProtocol
from proxy.upstream import Connector, Pool

# The raw authorities (Host spellings) whose series are remembered per endpoint; past this the
# map starts over. The series themselves are bounded by authority_label.
MAX_SPELLINGS = 4096
# Balancers by service name; past this many (services come and go) the map starts over.
MAX_BALANCERS = 1024
# A refused or timed-out connection sent nothing, so another endpoint can take the request (or
# TCP connection): at most this many endpoints are tried, and none once this long has passed
# since the first try (Linkerd's outbound failfast, 3 s: three connect timeouts).
MAX_CONNECT_ATTEMPTS = 8
CONNECT_FAILFAST = 3.0

log = logging.getLogger(__name__)
connect_log = PeerLog(log)


def _try_another(
    error: UpstreamError,
    svc: Service,
    balancer: PeakEwmaBalancer[Endpoint],
    attempt: int,
    first: float,
    now: float,
) -> bool:
    """After connection attempt number ``attempt`` (the first at ``first``) failed with
    ``error``: whether another endpoint of ``svc`` is to be tried at ``now`` (and said so)."""
    if attempt >= MAX_CONNECT_ATTEMPTS or now - first >= CONNECT_FAILFAST:
        return False
    if not balancer.available():
        return False
    connect_log.info("%s; trying another endpoint of %s", error, svc.name)
    return True


def route_rule(svc: Service, ex: Exchange) -> OutboundRule | None:
    """The rule of ``svc`` that ``ex`` matches, when it has timeouts or retries."""
    target = request_path(ex.url)
    path, _, query_text = target.partition("?")
    headers = (
        {name.lower(): value for name, value in request_headers(ex)} if svc.needs_headers else {}
    )
    query = dict(parse_qsl(query_text, keep_blank_values=True)) if svc.needs_query else {}
    rule = svc.rule_for(ex.method.decode("latin-1"), path.partition("#")[0], headers, query)
    return rule if rule is not None and rule.limits else None


def authority_label(svc: Service, authority: str) -> str:
    """The ``authority`` label of a request routed to ``svc``: the authority as asked, when it
    is one of the service's own names (in lower case), else the service's name. Case, port and
    short-name variants that a client can make up without end do not each get a series."""
    spelled = authority.lower().rstrip(".")
    return spelled if spelled == svc.name or spelled in svc.authorities else svc.name


@dataclass(slots=True)
class _Choice:
    """One request's endpoint choice, completed exactly once on the balancer."""

    balancer: PeakEwmaBalancer[Endpoint]
    endpoint: Endpoint
    series: HttpSeries
    picked_at: float  # the endpoint's latency counts from here (not from a failed try before)
    completed: bool = False


class OutboundHttp:
    """The HTTP dispatcher of the outbound side (see :class:`proxy.http1_exchange.Dispatcher`)."""

    def __init__(
        self,
        outbound: Outbound,
        service: str | None = None,
    ) -> None:
        self.outbound = outbound
        self.fixed_service = service  # upstream listener: every request goes to this service

    def describe(self) -> str:
        return "outbound"

    def _service(self, ex: Exchange) -> Service | None:
        routes = self.outbound.routes
        if self.fixed_service is not None:
            return routes.by_name(self.fixed_service)
        return routes.by_authority(ex.authority)

    def begin(self, ex: Exchange, now: float) -> None:
        svc = self._service(ex)
        if svc is None:
            # A route source that is still discovering the authority (the destination client)
            # may offer a bounded wait; the endpoint is then chosen in connect().
            resolving = getattr(self.outbound.routes, "resolving", None)
            pending = resolving(ex.authority) if resolving is not None else None
            if pending is None:
                raise UnknownRoute(f"no service is known for authority {quoted(ex.authority)}")
            ex.target = pending
            return
        replay = ex.replay
        if replay is not None and replay.tries:  # begun again: a retry (see Http1Server.retry)
            label = authority_label(svc, ex.authority)
            self.outbound.metrics.retry_total.inc(("outbound", label, replay.reason))
        self._choose(ex, svc, now)

    def _choose(self, ex: Exchange, svc: Service, now: float) -> None:
        out = self.outbound
        balancer = out.balancer(svc, now)
        before = ex.target
        # Chosen again (a retry, or a failover): another endpoint than last time, if any.
        ep = balancer.pick(now, before.endpoint if isinstance(before, _Choice) else None)
        key = (ex.authority, ep)
        series = out.series.get(key)
        if series is None:
            label = authority_label(svc, ex.authority)
            labels = ("outbound", label, "true" if ep.meshed else "no_identity", "", ep.identity or "")  # fmt: skip
            series = out.metrics.http_series(labels)
            if len(out.series) >= MAX_SPELLINGS:
                out.series.clear()  # clients' spellings of authorities, not series: refilled
            out.series[key] = series
        series.requests.n += 1
        ex.target = _Choice(balancer, ep, series, now)
        if svc.rules and before is None:  # matched once: a retry keeps the rule it began with
            ex.rule = route_rule(svc, ex)

    def take(self, ex: Exchange) -> Link | None:
        if not isinstance(ex.target, _Choice):
            return None  # still resolving
        return self.outbound.pool.take(ex.target.endpoint)

    async def connect(self, ex: Exchange) -> Link:
        if not isinstance(ex.target, _Choice):
            await ex.target
            ex.target = None
            svc = self._service(ex)
            if svc is None:
                raise UnknownRoute(f"no service is known for authority {quoted(ex.authority)}")
            self._choose(ex, svc, self.outbound.clock())
        out = self.outbound
        first = out.clock()
        for attempt in range(1, MAX_CONNECT_ATTEMPTS + 1):
            choice: _Choice = ex.target
            try:
                link = await out.connector.connect(choice.endpoint, SessionProtocol.HTTP1)
            except UpstreamError as e:
                # Nothing of the request has been sent: another endpoint can take it, unless
                # the request was given up while this try connected (a route timeout answered
                # it, or sent it again: the choice was settled then, and is not this loop's).
                now = out.clock()
                given_up = choice.completed
                choice.completed = True
                out.failed(choice.balancer, choice.endpoint, e, pooled=True, picked=not given_up)
                if given_up:
                    raise
                svc = self._service(ex)
                if svc is None or not _try_another(
                    e, svc, out.balancer(svc, now), attempt, first, now
                ):
                    raise
                choice.series.requests.n -= 1  # counted where it goes instead
                self._choose(ex, svc, now)
            else:
                choice.balancer.connected(choice.endpoint)
                return link
        raise AssertionError("unreachable")

    def response_head(self, ex: Exchange, status: int, now: float) -> None:
        choice: _Choice | None = ex.target
        if choice is None:  # refused before routing: one series, whatever authority was asked
            series = self.outbound.metrics.http_series(("outbound", "", "", "", ""))
            series.requests.n += 1
        else:
            series = choice.series
            if not choice.completed:
                choice.completed = True
                choice.balancer.complete(choice.endpoint, choice.picked_at, now)
        series.respond(status, (now - ex.started) * 1000.0)

    def finish(self, ex: Exchange, link: Link | None, reusable: bool) -> None:
        choice: _Choice | None = ex.target
        if choice is not None and not choice.completed:  # failed before any response head
            choice.completed = True
            choice.balancer.complete(choice.endpoint, choice.picked_at, self.outbound.clock())
        if link is not None:
            if reusable and choice is not None:
                self.outbound.pool.put(choice.endpoint, link)
            else:
                link.close()


class Outbound:
    """Routes, balancers, pooled mesh connections and the accept logic of the outbound side."""

    def __init__(
        self,
        routes: RouteSource,
        connector: Connector,
        metrics: ProxyMetrics,
        *,
        detect_timeout: float = DETECT_TIMEOUT,
        head_timeout: float = HEAD_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self.routes = routes
        self.connector = connector
        self.metrics = metrics
        self.detect_timeout = detect_timeout
        self.head_timeout = head_timeout
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.pool = Pool(clock=self.clock)
        self.http = OutboundHttp(self)
        self._rng = rng or random.Random()
        self._balancers: dict[str, tuple[Service, PeakEwmaBalancer[Endpoint]]] = {}
        # (authority, endpoint) -> the metrics series its requests count in
        self.series: dict[tuple[str, Endpoint], HttpSeries] = {}
        # (service name, endpoint) -> the task reconnecting to that endpoint while it is down
        self._probes: dict[tuple[str, Endpoint], asyncio.Task[None]] = {}

    def balancer(self, svc: Service, now: float) -> PeakEwmaBalancer[Endpoint]:
        """The balancer of ``svc``, following endpoint changes (a new Service value)."""
        known = self._balancers.get(svc.name)
        if known is None:
            if len(self._balancers) >= MAX_BALANCERS:
                self._balancers.clear()  # services come and go; their latency estimates regrow
            bal = PeakEwmaBalancer(svc.endpoints, now=now, rng=self._rng)
            self._balancers[svc.name] = (svc, bal)
            return bal
        old, bal = known
        if old is not svc:
            if old.endpoints != svc.endpoints:
                bal.set_endpoints(svc.endpoints, now=now)
            self._balancers[svc.name] = (svc, bal)
        return bal

    # -- endpoints that are down ----------------------------------------------------------------

    def failed(
        self,
        balancer: PeakEwmaBalancer[Endpoint],
        endpoint: Endpoint,
        error: UpstreamError,
        *,
        pooled: bool,
        picked: bool = True,
    ) -> None:
        """A request's connection to ``endpoint`` failed: it is down in ``balancer`` and
        reconnected to in the background until a connection succeeds (the balancer has it back
        then). A probe of an HTTP endpoint (``pooled``) opens the connection the next request
        takes from the pool; one of an opaque endpoint stops after the TLS handshake, so the
        application behind it sees no connection. ``picked``: the request is still pending on
        ``endpoint`` in the balancer."""
        delay = balancer.failed(endpoint, picked=picked)
        if delay is None:
            return
        name = next((n for n, (_, b) in self._balancers.items() if b is balancer), None)
        if name is None or (name, endpoint) in self._probes:
            return  # a balancer no longer in use, or the endpoint is being probed already
        connect_log.info(
            "%s; endpoint %s of %s is out of the balancer until a reconnection succeeds",
            error, endpoint.label, name,
        )  # fmt: skip
        task = self.loop.create_task(self._probe(name, balancer, endpoint, delay, pooled))
        self._probes[(name, endpoint)] = task

    async def _probe(
        self,
        name: str,
        balancer: PeakEwmaBalancer[Endpoint],
        endpoint: Endpoint,
        delay: float | None,
        pooled: bool,
    ) -> None:
        attempts = 0
        try:
            while delay is not None:
                await asyncio.sleep(delay)
                known = self._balancers.get(name)
                if known is None or known[1] is not balancer or not balancer.is_down(endpoint):
                    return  # gone from the service, or a request connected to it meanwhile
                attempts += 1
                protocol = SessionProtocol.HTTP1 if pooled else None
                try:
                    link = await self.connector.connect(endpoint, protocol, header=pooled)
                except UpstreamError as e:
                    log.debug("reconnecting to %s of %s: %s", endpoint.label, name, e)
                    delay = balancer.failed(endpoint, picked=False)
                    continue
                balancer.connected(endpoint)
                if pooled:
                    self.pool.put(endpoint, link)
                else:
                    link.close()
                connect_log.info(
                    "endpoint %s of %s is back in the balancer (reconnected after %d %s)",
                    endpoint.label, name, attempts, "try" if attempts == 1 else "tries",
                )  # fmt: skip
                return
        finally:
            self._probes.pop((name, endpoint), None)

    def close(self) -> None:
        """Stop reconnecting to the endpoints that are down (the proxy is stopping)."""
        for task in list(self._probes.values()):
            task.cancel()
        self._probes.clear()

    # -- accepting ----------------------------------------------------------------------------

    def accept(self, link: Link) -> None:
        """A connection on the outbound port: HTTP/1 is routed by authority."""
        self.metrics.opened(link, ("outbound", "src", "no_identity", "", ""))
        Detector(link, self._detected_outbound_port, self.detect_timeout)

    def _detected_outbound_port(self, link: Link, verdict: Detected, buffered: bytes) -> None:
        if verdict.proto is Proto.HTTP1:
            Http1Server(link, self.http, buffered, self.head_timeout)
        elif verdict.proto is Proto.HTTP2:
            # Not routed by authority here (yet): say so in HTTP/2's own terms, so that the
            # client names the reason, and clients that can retry over HTTP/1.1 do.
            link.write(H2_HTTP_1_1_REQUIRED)
            LingeringClose(link)
        else:
            link.close()  # no original destination to send opaque bytes to

    def upstream_listener(self, service: str) -> UpstreamListener:
        return UpstreamListener(self, service)


def _h2_goaway(error_code: int, debug: bytes) -> bytes:
    """A server's connection preface (an empty SETTINGS frame) and a GOAWAY that processed no
    stream (RFC 9113 4.1, 6.5, 6.8)."""
    settings = b"\x00\x00\x00" + b"\x04\x00" + b"\x00\x00\x00\x00"
    payload = b"\x00\x00\x00\x00" + error_code.to_bytes(4, "big") + debug
    return settings + len(payload).to_bytes(3, "big") + b"\x07\x00" + b"\x00\x00\x00\x00" + payload


# HTTP_1_1_REQUIRED (0xd, RFC 9113 7): what an HTTP/2 client on the outbound port is told.
H2_HTTP_1_1_REQUIRED = _h2_goaway(
    0xD, b"the TrustMesh proxy routes HTTP/1.1 only on its outbound port; use HTTP/1.1"
)


class UpstreamListener:
    """A local port mapped to one service (how traffic enters without iptables)."""

    def __init__(self, outbound: Outbound, service: str) -> None:
        self.outbound = outbound
        self.service = service
        self.http = OutboundHttp(outbound, service)

    def accept(self, link: Link) -> None:
        out = self.outbound
        out.metrics.opened(link, ("outbound", "src", "no_identity", "", ""))
        svc = out.routes.by_name(self.service)
        if svc is not None and svc.protocol is ServiceProtocol.OPAQUE:
            # uvloop reads once right after connection_made even when paused there: keep
            # those bytes (EOF is remembered by the link) until the relay takes over.
            link.sink = hold = _Hold()
            link.pause_reading()
            out.loop.create_task(self._relay(link, svc, b"", hold))
        else:
            Detector(link, self._detected, out.detect_timeout)

    def _detected(self, link: Link, verdict: Detected, buffered: bytes) -> None:
        if verdict.proto is Proto.HTTP1:
            Http1Server(link, self.http, buffered, self.outbound.head_timeout)
            return
        svc = self.outbound.routes.by_name(self.service)
        if svc is None:
            link.close()
            return
        link.pause_reading()
        self.outbound.loop.create_task(self._relay(link, svc, buffered))

    async def _relay(
        self, link: Link, svc: Service, early: bytes, hold: _Hold | None = None
    ) -> None:
        out = self.outbound
        link.pause_reading()
        first = out.clock()
        for attempt in range(1, MAX_CONNECT_ATTEMPTS + 1):
            now = out.clock()
            try:
                bal = out.balancer(svc, now)
                ep = bal.pick(now)
                upstream = await out.connector.connect(ep, None)
            except UpstreamError as e:
                out.failed(bal, ep, e, pooled=False)
                if not link.closed and _try_another(e, svc, bal, attempt, first, out.clock()):
                    continue
                link.abort()
                return
            except ProxyError:
                link.abort()
                return
            bal.connected(ep)
            bal.complete(ep, now, out.clock())
            break
        if link.closed:
            upstream.close()
            return
        Relay(link, upstream, early_a=early + hold.data if hold is not None else early)
        link.resume_reading()


class _Hold(NullSink):
    """Buffers what a link reads before its relay exists (other events are ignored)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
