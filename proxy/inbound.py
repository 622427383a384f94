"""The inbound side: from the mesh to the local application.

A connection on the inbound port is detected first. A TLS ClientHello whose SNI is this
proxy's identity is terminated with mesh TLS (other SNIs are refused: there is nothing to pass
them through to without ``SO_ORIGINAL_DST``); the client identity comes from its certificate.
With ALPN ``transport.l5d.io/v1`` the transport header names the local target port and
protocol; otherwise (and for plaintext clients) the configured default port is the target and
the protocol is detected. The port's policy then decides: a denied TCP connection is closed,
a denied HTTP request gets 403 with ``l5d-proxy-error``; authorized HTTP requests carry
``l5d-client-id``. Connections that outlive a decision (TCP relays, and HTTP connections an
``Upgrade`` answered with 101 or a CONNECT answered with 2xx turned into relays, e.g.
WebSocket) are decided again when the policy changes, and closed once it no longer authorizes
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time

from pki.errors import quoted
from proxy.detect import Detected, Proto
from proxy.errors import (
    Forbidden,
    ProxyError,
    TLSError,
    TransportHeaderError,
    UnknownRoute,
    handshake_result,
)
from proxy.http1 import Exchange, Http1Server
from proxy.http1_exchange import request_headers, request_path
from proxy.link import NULL_SINK, Link, NullSink
from proxy.listener import Detector
from proxy.lograte import PeerLog
from proxy.meshtls import HandshakeInfo, MeshTls, canonical_identity
from proxy.metrics import Count, HttpSeries, ProxyMetrics
from proxy.policy import (
    Decision,
    PolicySource,
    RequestFacts,
    Server,
    authorize,
    authorize_request,
    client_address,
    reauthorize,
    server_for,
)
from proxy.routes import Endpoint
from proxy.settings import DETECT_TIMEOUT, HEAD_TIMEOUT
from proxy.tcp import Relay
from proxy.transport_header import ALPN, SessionProtocol, decode
from proxy.upstream import Connector, Pool

log = logging.getLogger(__name__)
peer_log = PeerLog(log)  # lines a peer can cause, one per connection: rate limited
# Distinct inbound authority label values per proxy (the Hosts an app is asked for).
MAX_AUTHORITY_LABELS = 256

# Seconds a mesh client has from its ClientHello to the end of its transport header: a
# handshake left unfinished held its connection and TLS state for ever.
SETUP_TIMEOUT = 10.0
# Seconds between checks of open relays (TCP, upgraded HTTP) against the policy.
REAUTHORIZE_INTERVAL = 1.0


class InboundHttp:
    """The HTTP dispatcher for one inbound connection: policy per request, local target."""

    __slots__ = (
        "allowed", "conn", "decision", "inbound", "policy_seen", "routed", "series", "series_for",
    )  # fmt: skip

    def __init__(self, inbound: Inbound, conn: _Conn) -> None:
        self.inbound = inbound
        self.conn = conn
        self.policy_seen: object = None
        self.decision: Decision | None = None
        self.allowed: Count | None = None  # the decision's allow counter, when it allows
        self.routed: Server | None = None  # the port's server, when its routes decide
        self.series: HttpSeries | None = None  # this connection's latest label set
        self.series_for = ""  # the Host it was chosen for

    def describe(self) -> str:
        conn = self.conn
        return f"inbound on port {conn.port} from {conn.client_id or 'no identity'} ({conn.ip})"

    def begin(self, ex: Exchange, now: float) -> None:
        inbound, conn = self.inbound, self.conn
        policy = inbound.policy.current()
        if policy is not self.policy_seen:  # re-decide only when the policy changed
            self.policy_seen = policy
            server = server_for(policy, conn.port)
            # With routes every request is decided on its own; without, the decision is the
            # connection's, kept for every request.
            self.routed = server if server.routes else None
            self.decision = self.allowed = None
            if self.routed is None:
                decision = self.decision = authorize(policy, conn.port, conn.client_id, conn.ip)
                if decision.allowed:
                    self.allowed = inbound.metrics.inbound_http_authz_allow_total.count(
                        (*conn.authz_labels(decision.server), "", decision.authorization or "")
                    )
        series = self.series
        if series is None or self.series_for != ex.authority:
            series = self.series = self._series(ex)
            self.series_for = ex.authority
        series.requests.n += 1
        if self.routed is not None:
            self._authorize_route(self.routed, ex)
        else:
            allowed = self.allowed
            if allowed is None:
                denied = self.decision
                assert denied is not None
                count_http_denial(inbound.metrics, conn.authz_labels(denied.server), denied)
                raise Forbidden(denied.reason)
            allowed.n += 1
        ex.target = series
        if conn.client_id:
            ex.extra_headers = conn.client_header

    def _authorize_route(self, server: Server, ex: Exchange) -> None:
        """The per-request decision of a server with HTTPRoutes."""
        conn, metrics = self.conn, self.inbound.metrics
        headers = request_headers(ex) if server.needs_headers else ()
        decision = authorize_request(
            server,
            conn.client_id,
            conn.ip,
            ex.method.decode("latin-1"),
            request_path(ex.url),
            headers,
        )
        labels = conn.authz_labels(decision.server)
        if decision.allowed:
            metrics.inbound_http_authz_allow_total.count(
                (*labels, decision.route or "", decision.authorization or "")
            ).n += 1
            return
        count_http_denial(metrics, labels, decision)
        if decision.no_route:
            raise UnknownRoute(decision.reason)
        raise Forbidden(decision.reason)

    def _series(self, ex: Exchange) -> HttpSeries:
        conn = self.conn
        labels = (
            "inbound",
            self._authority_label(ex.authority),
            conn.tls,
            conn.client_id or "",
            "",
        )
        return self.inbound.metrics.http_series(labels)

    def _authority_label(self, authority: str) -> str:
        """The Host as the app is asked for it, in lower case; once MAX_AUTHORITY_LABELS are in
        use, further ones count without an authority label (any client that reaches the port
        can make Host values up)."""
        label = authority.lower()
        known = self.inbound.authorities
        if label not in known:
            if len(known) >= MAX_AUTHORITY_LABELS:
                return ""
            known.add(label)
        return label

    def take(self, ex: Exchange) -> Link | None:
        return self.inbound.pool.take(self.conn.port)

    async def connect(self, ex: Exchange) -> Link:
        return await self.inbound.connector.connect(self.inbound.app(self.conn.port), None)

    def response_head(self, ex: Exchange, status: int, now: float) -> None:
        series: HttpSeries = ex.target or self._series(ex)  # none when refused by policy
        series.respond(status, (now - ex.started) * 1000.0)

    def finish(self, ex: Exchange, link: Link | None, reusable: bool) -> None:
        if link is not None:
            if reusable:
                self.inbound.pool.put(self.conn.port, link)
            else:
                link.close()
        elif ex.upgrade and ex.resp is not None and ex.resp.head_sent:
            # Only the switch to a relay (after a 101, or a 2xx to CONNECT) ends an exchange
            # whose answer was written without handing its upstream link back: from here on no
            # request is seen, so the upgrade request is what the connection stays authorized as.
            facts = RequestFacts(
                ex.method.decode("latin-1"), request_path(ex.url), tuple(request_headers(ex))
            )
            self.inbound.track(self.conn, facts, self.policy_seen)


def count_http_denial(metrics: ProxyMetrics, labels: tuple[str, ...], decision: Decision) -> None:
    """One HTTP request (or upgraded connection) ``decision`` denied, in Linkerd's families:
    ``inbound_http_route_not_found_total`` when no route of its server matched it, else
    ``inbound_http_authz_deny_total`` (``labels``: the connection's, see _Conn.authz_labels)."""
    if decision.no_route:
        metrics.inbound_http_route_not_found_total.inc(labels)
    else:
        metrics.inbound_http_authz_deny_total.inc((*labels, decision.route or "", "unauthorized"))


class _Conn:
    """What the inbound side knows about one client connection."""

    __slots__ = (
        "checked", "client_header", "client_id", "ip", "link", "port", "request", "timer", "tls",
    )  # fmt: skip

    def __init__(self, link: Link) -> None:
        self.link = link
        self.ip = client_address(link.peer[0] if link.peer else "0.0.0.0")
        self.client_id: str | None = None
        self.client_header = b""
        self.tls = "no_identity"
        self.port = 0
        # Once it is a relay: the upgrade request it was admitted by (None for TCP), and
        # the policy it was last authorized under.
        self.request: RequestFacts | None = None
        self.checked: object = None
        # From the ClientHello until the connection is dispatched (see Inbound.setup_timeout).
        self.timer: asyncio.TimerHandle | None = None

    def authz_labels(self, server: str) -> tuple[str, str, str, str]:
        """This connection's labels in the authorization families (metrics.AUTHZ_LABELS)."""
        return (str(self.port), server, self.tls, self.client_id or "")


class _HeaderReader(NullSink):
    """Reads the transport header that follows the handshake, then dispatches."""

    __slots__ = ("buffer", "conn", "inbound")

    def __init__(self, inbound: Inbound, conn: _Conn) -> None:
        self.inbound, self.conn = inbound, conn
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            parsed = decode(self.buffer)
        except TransportHeaderError as e:
            peer_log.info("closing inbound connection: %s", e)
            self.conn.link.abort()
            return
        if parsed is None:
            return
        header, used = parsed
        self.conn.link.sink = NULL_SINK
        self.conn.port = header.port
        proto = Proto.HTTP1 if header.protocol is SessionProtocol.HTTP1 else None
        self.inbound.dispatch(self.conn, proto, self.buffer[used:])

    def eof_received(self) -> None:
        self.conn.link.close()


class Inbound:
    """Terminates mesh TLS, authorizes and forwards to the local application."""

    def __init__(
        self,
        tls: MeshTls,
        policy: PolicySource,
        metrics: ProxyMetrics,
        *,
        app_host: str = "127.0.0.1",
        default_port: int | None = None,
        allowed_ports: frozenset[int] | None = None,
        detect_timeout: float = DETECT_TIMEOUT,
        head_timeout: float = HEAD_TIMEOUT,
        setup_timeout: float = SETUP_TIMEOUT,
    ) -> None:
        self.tls = tls
        self.policy = policy
        self.metrics = metrics
        self.app_host = app_host
        self.default_port = default_port
        self.allowed_ports = allowed_ports
        self.detect_timeout = detect_timeout
        self.head_timeout = head_timeout
        self.setup_timeout = setup_timeout
        self.loop = asyncio.get_running_loop()
        self.connector = Connector(None, metrics, direction="inbound")
        self.pool = Pool(clock=self.loop.time)
        self.authorities: set[str] = set()  # authority label values in use (bounded)
        self._apps: dict[int, Endpoint] = {}
        # The proxy's own listeners as the application host reaches them (see listener_ports):
        # never a target, or a meshed client could relay through the outbound listener with
        # this proxy's identity, or loop through the inbound one.
        self.own_ports: frozenset[int] = frozenset()
        # Open relays (TCP, upgraded HTTP), re-authorized when the policy changes (checked
        # this often while any is open).
        self.reauthorize_interval = REAUTHORIZE_INTERVAL
        self._relays: set[_Conn] = set()
        self._reauthorizing = False

    def app(self, port: int) -> Endpoint:
        ep = self._apps.get(port)
        if ep is None:
            ep = self._apps[port] = Endpoint(self.app_host, port)
        return ep

    def accept(self, link: Link) -> None:
        Detector(link, self._detected, self.detect_timeout)

    def _detected(self, link: Link, verdict: Detected, buffered: bytes) -> None:
        conn = _Conn(link)
        if verdict.proto is not Proto.TLS:
            self._opened(conn)
            self._plain(conn, verdict, buffered)
            return
        try:
            identity = self.tls.credentials.identity
            # Server names compare without regard to ASCII case (RFC 6066), as identities do.
            if verdict.sni is not None and canonical_identity(verdict.sni) != canonical_identity(
                identity
            ):
                raise TLSError(f"SNI {verdict.sni} is not this proxy's identity {identity}")
            session = self.tls.server_session()
        except TLSError as e:
            peer_log.info("refusing inbound TLS: %s", e)
            self.metrics.tls_handshakes_total.inc(("inbound", "none", "refused"))
            link.abort()
            return
        link.on_handshake = lambda lk, info, err: self._handshaken(conn, info, err)
        conn.timer = self.loop.call_later(self.setup_timeout, self._stalled, conn)
        link.start_tls(session, buffered)

    def _stalled(self, conn: _Conn) -> None:
        """The client did not finish its handshake (or send its transport header) in time."""
        conn.timer = None
        link = conn.link
        if link.closed:
            return
        if link.tls is not None and link.tls.info is None:
            stage = "the TLS handshake"
            self.metrics.tls_handshakes_total.inc(("inbound", link.tls.group or "none", "timeout"))
        else:
            stage = "the transport header"
        peer_log.info(
            "closing inbound connection from %s: %s was not complete within %gs",
            conn.ip, stage, self.setup_timeout,
        )  # fmt: skip
        link.abort()

    @staticmethod
    def _set_up(conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _handshaken(
        self, conn: _Conn, info: HandshakeInfo | None, error: ProxyError | None
    ) -> None:
        link = conn.link
        if info is None:
            self._set_up(conn)
            group = (link.tls.group if link.tls else None) or "none"
            self.metrics.tls_handshakes_total.inc(("inbound", group, handshake_result(error)))
            peer_log.info("inbound TLS handshake from %s failed: %s", conn.ip, error)
            return
        self.metrics.tls_handshakes_total.inc(("inbound", info.group, "ok"))
        conn.client_id = info.peer_identity
        conn.tls = "true"
        if info.peer_identity:
            conn.client_header = b"l5d-client-id: " + info.peer_identity.encode() + b"\r\n"
        if info.peer_identity is not None and math.isfinite(info.peer_not_after):
            # The handshake proved the identity with a certificate valid until then: the
            # connection is retired at that time (the outbound side does the same with the
            # server's), so no HTTP request of an expired identity is served on a connection
            # opened before. A relay keeps running (see Http1Server.link_retired).
            link.retire_at(self.loop.time() + info.peer_not_after - time.time())
        self._opened(conn)
        if info.alpn == ALPN:
            link.sink = _HeaderReader(self, conn)
        else:
            self._set_up(conn)  # the detector has its own timeout
            Detector(link, lambda lk, v, buf: self._plain(conn, v, buf), self.detect_timeout)

    def _opened(self, conn: _Conn) -> None:
        self.metrics.opened(conn.link, ("inbound", "src", conn.tls, conn.client_id or "", ""))

    def _plain(self, conn: _Conn, verdict: Detected, buffered: bytes) -> None:
        if self.default_port is None:
            conn.link.close()  # no transport header and nowhere configured to send it
            return
        conn.port = self.default_port
        self.dispatch(conn, Proto.HTTP1 if verdict.proto is Proto.HTTP1 else None, buffered)

    def dispatch(self, conn: _Conn, proto: Proto | None, early: bytes) -> None:
        """Hand an identified connection to HTTP/1 forwarding or the opaque relay."""
        self._set_up(conn)
        if (
            self.allowed_ports is not None and conn.port not in self.allowed_ports
        ) or conn.port in self.own_ports:
            peer_log.info(
                "closing inbound connection for port %d: not an application port", conn.port
            )
            conn.link.abort()
            return
        if proto is Proto.HTTP1:
            Http1Server(
                conn.link,
                InboundHttp(self, conn),
                early,
                self.head_timeout,
                cancel_on_eof=conn.tls == "true",
            )
            return
        policy = self.policy.current()
        decision = authorize(policy, conn.port, conn.client_id, conn.ip)
        if not decision.allowed:
            self.metrics.inbound_tcp_authz_deny_total.inc(conn.authz_labels(decision.server))
            conn.link.close()
            return
        self.metrics.inbound_tcp_authz_allow_total.inc(
            (*conn.authz_labels(decision.server), decision.authorization or "")
        )
        self.track(conn, None, policy)
        conn.link.pause_reading()
        self.loop.create_task(self._relay(conn, early))

    def track(self, conn: _Conn, request: RequestFacts | None, checked: object) -> None:
        """Re-authorize ``conn``, now a relay admitted under the policy ``checked`` (by the
        upgrade ``request``, or as TCP when None), whenever the policy changes."""
        conn.request, conn.checked = request, checked
        self._relays.add(conn)
        if not self._reauthorizing:
            self._reauthorizing = True
            self.loop.call_later(self.reauthorize_interval, self._reauthorize)

    @property
    def relays_watched(self) -> int:
        """Relays under re-authorization (closed ones leave at the next check)."""
        return len(self._relays)

    @property
    def reauthorizing(self) -> bool:
        """Whether the periodic check runs (only while a relay is open)."""
        return self._reauthorizing

    def _reauthorize(self) -> None:
        """Close the open relays a changed policy no longer authorizes (Linkerd does so for
        TCP; an upgraded HTTP connection is judged as its upgrade request was, or it would
        keep what a revocation took away); runs every ``reauthorize_interval`` while any is
        open."""
        relays = self._relays = {c for c in self._relays if not c.link.closed}
        if not relays:
            self._reauthorizing = False
            return
        policy = self.policy.current()
        for conn in tuple(relays):
            # Per connection: an upgrade may have been admitted under an older policy than
            # the one the other relays were last checked under.
            if conn.checked is policy:
                continue
            conn.checked = policy
            decision = reauthorize(policy, conn.port, conn.client_id, conn.ip, conn.request)
            if decision.allowed:
                continue
            request, labels = conn.request, conn.authz_labels(decision.server)
            if request is None:
                peer_log.info("closing inbound TCP connection: %s", decision.reason)
                self.metrics.inbound_tcp_authz_deny_total.inc(labels)
            else:
                # The path without the query, which may carry credentials.
                peer_log.info(
                    "closing inbound upgraded HTTP connection (%s %s): %s",
                    request.method,
                    quoted(request.target.partition("?")[0]),
                    decision.reason,
                )
                count_http_denial(self.metrics, labels, decision)
            relays.discard(conn)
            conn.link.abort()
        self.loop.call_later(self.reauthorize_interval, self._reauthorize)

    async def _relay(self, conn: _Conn, early: bytes) -> None:
        try:
            upstream = await self.connector.connect(self.app(conn.port), None)
        except ProxyError as e:
            peer_log.info("inbound TCP to port %d failed: %s", conn.port, e)
            conn.link.abort()
            return
        if conn.link.closed:
            upstream.close()
            return
        Relay(conn.link, upstream, early_a=early)
        conn.link.resume_reading()


def listener_ports(addresses: list[tuple[str, int]], app_host: str) -> frozenset[int]:
    """The ports among listener ``addresses`` (host, port) that a connection to
    ``app_host`` reaches: those bound to it, to a wildcard address, or to loopback when it
    is loopback."""
    try:
        app_loopback = ipaddress.ip_address(app_host).is_loopback
    except ValueError:
        app_loopback = app_host == "localhost"
    out = set()
    for host, port in addresses:
        if host in ("0.0.0.0", "::", "", app_host):
            out.add(port)
            continue
        with contextlib.suppress(ValueError):
            if app_loopback and ipaddress.ip_address(host.partition("%")[0]).is_loopback:
                out.add(port)
    return frozenset(out)
