"""Policy documents into resources: Server, AuthorizationPolicy, MeshTLSAuthentication,
NetworkAuthentication (group ``policy.trustmesh.io``, or Linkerd's ``policy.linkerd.io``) and
Gateway API HTTPRoute, with Linkerd's semantics and its retry/timeout annotations."""

from __future__ import annotations

from datetime import timedelta

from destination.documents import (
    Doc,
    check_default_policy,
    guard,
    parse_meta,
    parse_selector,
    parse_target_ref,
)
from destination.errors import InvalidResource
from destination.policy import HttpMatch, Network, PathMatch, Protocol, ValueMatch
from destination.resources import (
    AuthorizationPolicy,
    BackendRef,
    HTTPRoute,
    HTTPRouteRule,
    MeshTLSAuthentication,
    Meta,
    NetworkAuthentication,
    RouteDefaults,
    RouteRetry,
    Server,
)
from pki.durations import parse_duration
from pki.errors import PKIError, quoted


def parse_server(obj: Doc) -> Server:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    protocol = spec.text("proxyProtocol", "unknown")
    access = spec.text("accessPolicy", "deny")
    guard(spec, "accessPolicy", lambda: check_default_policy(access))
    return Server(
        meta,
        parse_selector(spec.child("podSelector", required=True)),
        spec.port_or_name("port"),
        guard(spec, "proxyProtocol", lambda: Protocol.parse(protocol)),
        access,
    )


def parse_authorization_policy(obj: Doc) -> AuthorizationPolicy:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    target = parse_target_ref(spec.require("targetRef"), ("Server", "Namespace", "HTTPRoute"))
    required = tuple(
        parse_target_ref(r, ("MeshTLSAuthentication", "NetworkAuthentication", "ServiceAccount"))
        for r in spec.docs("requiredAuthenticationRefs", required=True)
    )
    if not required:
        raise spec.fail("requiredAuthenticationRefs", "must name at least one authentication")
    if sum(r.kind == "MeshTLSAuthentication" for r in required) > 1:
        raise spec.fail("requiredAuthenticationRefs", "may name at most one MeshTLSAuthentication")
    if sum(r.kind == "NetworkAuthentication" for r in required) > 1:
        raise spec.fail("requiredAuthenticationRefs", "may name at most one NetworkAuthentication")
    if any(r.kind == "MeshTLSAuthentication" for r in required) and any(
        r.kind == "ServiceAccount" for r in required
    ):
        raise spec.fail(
            "requiredAuthenticationRefs",
            "cannot combine a MeshTLSAuthentication with ServiceAccount refs",
        )
    return AuthorizationPolicy(meta, target, required)


def parse_mesh_tls(obj: Doc) -> MeshTLSAuthentication:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    ids = spec.strings("identities")
    refs = tuple(
        parse_target_ref(r, ("ServiceAccount", "Namespace")) for r in spec.docs("identityRefs")
    )
    if not ids and not refs:
        raise spec.fail("identities", "at least one of identities or identityRefs is required")
    return MeshTLSAuthentication(meta, ids, refs)


def parse_network_authentication(obj: Doc) -> NetworkAuthentication:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    nets = tuple(_network(n) for n in spec.docs("networks", required=True))
    if not nets:
        raise spec.fail("networks", "must list at least one network")
    return NetworkAuthentication(meta, nets)


def _network(doc: Doc) -> Network:
    cidr, exceptions = doc.text("cidr", required=True), doc.strings("except")
    return guard(doc, "cidr", lambda: Network.parse(cidr, exceptions))


def _value_match(doc: Doc) -> ValueMatch:
    name, value = doc.text("name", required=True), doc.text("value", required=True)
    kind = doc.text("type", "Exact")
    return guard(doc, "value", lambda: ValueMatch(name, value, kind))


def _match(doc: Doc) -> HttpMatch:
    path = doc.child("path")
    path_match = None
    if path is not None:
        kind, value = path.text("type", "PathPrefix"), path.text("value", "/")
        path_match = guard(path, "value", lambda: PathMatch(kind, value))
    return HttpMatch(
        path_match,
        tuple(_value_match(h) for h in doc.docs("headers")),
        doc.text("method"),
        tuple(_value_match(q) for q in doc.docs("queryParams")),
    )


def parse_status_codes(text: str, field: str) -> tuple[tuple[int, int], ...]:
    """``5xx``, ``gateway-error``, ``500-504,429`` into inclusive ranges."""
    out = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if item == "5xx":
            out.append((500, 599))
        elif item == "gateway-error":
            out.append((502, 504))
        elif item:
            lo, _, hi = item.partition("-")
            try:
                rng = (int(lo), int(hi or lo))
            except ValueError:
                raise InvalidResource(
                    f"{quoted(item)} is not a status code, range, 5xx or gateway-error", field=field
                ) from None
            if not 100 <= rng[0] <= rng[1] <= 599:
                raise InvalidResource(
                    f"status range {quoted(item)} is outside 100..599", field=field
                )
            out.append(rng)
    return tuple(out)


def parse_route_defaults(meta: Meta) -> RouteDefaults:
    """The retry and timeout annotations of an HTTPRoute or Service."""
    timeouts: dict[str, timedelta | None] = {}
    for kind in ("request", "response", "idle"):
        text = meta.annotation(f"timeout.trustmesh.io/{kind}") or meta.annotation(
            f"timeout.linkerd.io/{kind}"
        )
        try:
            timeouts[kind] = parse_duration(text) if text else None
        except PKIError as e:
            raise InvalidResource(
                str(e), field=f"metadata.annotations[timeout.linkerd.io/{kind}]"
            ) from None
    return RouteDefaults(
        parse_retry_annotations(meta), timeouts["request"], timeouts["response"], timeouts["idle"]
    )


def parse_retry_annotations(meta: Meta) -> RouteRetry | None:
    """Linkerd's ``retry.linkerd.io/*`` annotations (TrustMesh also reads ``retry.trustmesh.io``)."""

    def get(key: str) -> str | None:
        return meta.annotation(f"retry.trustmesh.io/{key}") or meta.annotation(
            f"retry.linkerd.io/{key}"
        )

    http, limit, timeout = get("http"), get("limit"), get("timeout")
    if http is None and limit is None and timeout is None:
        return None
    field = "metadata.annotations[retry.linkerd.io/{}]"
    codes = parse_status_codes(http, field.format("http")) if http else None
    attempts = None
    if limit is not None:
        if not (limit.isascii() and limit.isdigit()) or len(limit) > 9:
            raise InvalidResource(f"{quoted(limit)} is not a number", field=field.format("limit"))
        attempts = int(limit)
    dur = None
    if timeout is not None:
        try:
            dur = parse_duration(timeout)
        except PKIError as e:
            raise InvalidResource(str(e), field=field.format("timeout")) from None
    return RouteRetry(codes, attempts, None, dur)


def parse_http_route(obj: Doc, group: str) -> HTTPRoute:
    meta = parse_meta(obj)
    spec = obj.child("spec", required=True)
    assert spec is not None
    parents = tuple(
        parse_target_ref(p, ("Service", "Server")) for p in spec.docs("parentRefs", required=True)
    )
    if not parents:
        raise spec.fail("parentRefs", "must name at least one parent")
    rules = []
    for r in spec.docs("rules"):
        backends = []
        for b in r.docs("backendRefs"):
            kind = b.text("kind", "Service")
            if kind != "Service":
                raise b.fail("kind", f"{kind!r} backends are not supported; use Service")
            backends.append(
                BackendRef(
                    b.text("name", required=True),
                    b.number("port", lo=1),
                    b.number("weight", 1, hi=1_000_000),
                    b.text("namespace"),
                )
            )
        timeouts = r.child("timeouts")
        retry = None
        rd = r.child("retry")
        if rd is not None:
            codes = tuple((c, c) for c in (rd.sequence("codes") or []))
            if any(not isinstance(c, int) or not 100 <= c <= 599 for c, _ in codes):
                raise rd.fail("codes", "must list HTTP status codes (100..599)")
            retry = RouteRetry(codes or None, rd.number("attempts", hi=100), rd.duration("backoff"))
        rules.append(
            HTTPRouteRule(
                tuple(_match(m) for m in r.docs("matches")),
                tuple(backends),
                timeouts.duration("request") if timeouts else None,
                timeouts.duration("backendRequest") if timeouts else None,
                retry,
            )
        )
    return HTTPRoute(
        meta,
        parents,
        tuple(rules) or (HTTPRouteRule(),),
        spec.strings("hostnames"),
        group,
        parse_route_defaults(meta),
    )
