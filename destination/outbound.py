"""Outbound policy resolution: routes, backends, timeouts and retries for a service authority.

HTTPRoutes whose ``parentRefs`` name the Service (GAMMA style, optionally one port) supply the
routes, in name order; a Service without routes gets one synthesized ``default`` route to itself.
Retries and timeouts come from the rule's own fields, overridden by the route's
``retry.linkerd.io`` / ``timeout.linkerd.io`` annotations, falling back to the Service's (as in
Linkerd, the annotation wins). Pure functions of a :class:`ClusterState`.
"""

from __future__ import annotations

from destination.endpoints import service_port_is_opaque
from destination.errors import NotFound
from destination.paths import Target
from destination.policy import (
    Backend,
    OutboundPolicy,
    OutboundRoute,
    Protocol,
    Ref,
    Retry,
    RouteRule,
    Timeouts,
)
from destination.resources import (
    ClusterState,
    HTTPRoute,
    HTTPRouteRule,
    MeshSettings,
    RouteDefaults,
    RouteRetry,
    Service,
)


def _protocol(svc: Service, target: Target, settings: MeshSettings) -> Protocol:
    sp = svc.port(target.port)
    if service_port_is_opaque(svc, sp, target.port) or target.port in settings.default_opaque_ports:
        return Protocol.OPAQUE
    app = sp.app_protocol if sp else None
    if app == "http":
        return Protocol.HTTP1
    if app == "kubernetes.io/h2c":
        return Protocol.HTTP2
    if app is not None:
        return Protocol.OPAQUE  # Linkerd: any other appProtocol is treated as opaque
    return Protocol.DETECT


def _retry(*candidates: RouteRetry | None) -> Retry | None:
    """The first configured retry wins, field by field defaults from Linkerd."""
    chosen = next((c for c in candidates if c is not None), None)
    if chosen is None:
        return None
    base = Retry()
    return Retry(
        max_retries=chosen.attempts if chosen.attempts is not None else base.max_retries,
        status_ranges=chosen.codes or base.status_ranges,
        timeout=chosen.timeout,
        min_backoff=chosen.backoff or base.min_backoff,
        max_backoff=max(chosen.backoff or base.max_backoff, base.max_backoff),
    )


def _rule(
    rule: HTTPRouteRule,
    route: HTTPRoute | None,
    svc: Service,
    target: Target,
) -> RouteRule:
    ns = svc.meta.namespace
    defaults = route.defaults if route else RouteDefaults()
    fallback = svc.defaults
    backends = tuple(
        Backend(
            f"{b.name}.{b.namespace or ns}.svc.{target.cluster_domain}:{b.port or target.port}",
            b.weight,
            Ref("Service", b.name, b.namespace or ns),
        )
        for b in rule.backends
    ) or (Backend(target.authority, 1, Ref("Service", svc.meta.name, ns)),)
    timeouts = Timeouts(
        request=defaults.request_timeout or rule.request_timeout or fallback.request_timeout,
        response=(
            defaults.response_timeout or rule.backend_request_timeout or fallback.response_timeout
        ),
        idle=defaults.idle_timeout or fallback.idle_timeout,
    )
    return RouteRule(
        rule.matches, backends, timeouts, _retry(defaults.retry, rule.retry, fallback.retry)
    )


def _attached(route: HTTPRoute, svc: Service, port: int) -> bool:
    return any(
        p.kind == "Service"
        and p.name == svc.meta.name
        and (p.namespace or route.meta.namespace) == svc.meta.namespace
        and p.port in (None, port)
        for p in route.parents
    )


def resolve_outbound(state: ClusterState, base: MeshSettings, target: Target) -> OutboundPolicy:
    """The outbound policy of ``target``; NotFound for an unknown Service."""
    svc = state.service(target.namespace, target.service)
    if svc is None:
        raise NotFound(f"service {target.namespace}/{target.service} does not exist")
    settings = state.settings(base)
    protocol = _protocol(svc, target, settings)
    attached = sorted(
        (r for r in state.http_routes if _attached(r, svc, target.port)),
        key=lambda r: (r.meta.namespace, r.meta.name),
    )
    routes = tuple(
        OutboundRoute(
            Ref("HTTPRoute", r.meta.name, r.meta.namespace, r.group),
            tuple(_rule(rule, r, svc, target) for rule in r.rules),
            r.hostnames,
        )
        for r in attached
    )
    if not routes or protocol is Protocol.OPAQUE:
        name = "opaq" if protocol is Protocol.OPAQUE else "http"
        routes = (
            OutboundRoute(Ref("default", name), (_rule(HTTPRouteRule(), None, svc, target),)),
        )
    return OutboundPolicy(
        target.authority,
        Ref("Service", svc.meta.name, svc.meta.namespace),
        protocol,
        routes,
        settings.detect_timeout,
    )
