"""Inbound authorization: default policies, servers, identity patterns and networks."""

from __future__ import annotations

import ipaddress

import pytest

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.errors import ConfigError
from proxy.http1_exchange import request_path
from proxy.policy import (
    Authorization,
    DefaultPolicy,
    HttpRoute,
    InboundPolicy,
    Server,
    authorize,
    authorize_request,
    parse_networks,
)

WEB = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
API = "api.pay.serviceaccount.identity.trustmesh.cluster.local"
LOCAL = ipaddress.ip_address("10.1.2.3")
OUTSIDE = ipaddress.ip_address("192.0.2.9")
CLUSTER = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("default", "identity", "ip", "allowed"),
    [
        (DefaultPolicy.ALL_UNAUTHENTICATED, None, OUTSIDE, True),
        (DefaultPolicy.ALL_AUTHENTICATED, None, LOCAL, False),
        (DefaultPolicy.ALL_AUTHENTICATED, WEB, OUTSIDE, True),
        (DefaultPolicy.CLUSTER_UNAUTHENTICATED, None, LOCAL, True),
        (DefaultPolicy.CLUSTER_UNAUTHENTICATED, None, OUTSIDE, False),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, WEB, LOCAL, True),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, WEB, OUTSIDE, False),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, None, LOCAL, False),
        (DefaultPolicy.DENY, WEB, LOCAL, False),
    ],
)
def test_default_policies(default: DefaultPolicy, identity, ip, allowed: bool) -> None:
    policy = InboundPolicy(default, cluster_networks=CLUSTER)
    decision = authorize(policy, 8080, identity, ip)
    assert decision.allowed is allowed
    assert decision.server == f"default:{default.value}"


def test_server_authorizations_by_identity_and_network() -> None:
    policy = InboundPolicy(
        DefaultPolicy.DENY,
        servers=(
            Server(
                "api-http",
                8080,
                (
                    Authorization(
                        "shop-ns", ("*.shop.serviceaccount.identity.trustmesh.cluster.local",)
                    ),
                    Authorization(
                        "probes", networks=parse_networks(["127.0.0.0/8"]), unauthenticated=True
                    ),
                ),
            ),
        ),
    )
    ok = authorize(policy, 8080, WEB, OUTSIDE)
    assert (ok.allowed, ok.authorization) == (True, "shop-ns")
    denied = authorize(policy, 8080, API, OUTSIDE)
    assert not denied.allowed
    assert API in denied.reason and "api-http" in denied.reason
    probe = authorize(policy, 8080, None, ipaddress.ip_address("127.0.0.1"))
    assert (probe.allowed, probe.authorization) == (True, "probes")
    unauth = authorize(policy, 8080, None, OUTSIDE)
    assert not unauth.allowed and "unauthenticated" in unauth.reason
    other_port = authorize(policy, 9090, WEB, LOCAL)
    assert not other_port.allowed and "denies every client" in other_port.reason


def test_validation() -> None:
    with pytest.raises(ConfigError, match="admits nobody"):
        Authorization("x")
    with pytest.raises(ConfigError, match="cluster_networks"):
        InboundPolicy(DefaultPolicy.CLUSTER_AUTHENTICATED)
    with pytest.raises(ConfigError, match="same port"):
        InboundPolicy(servers=(Server("a", 80), Server("b", 80)))
    with pytest.raises(ConfigError, match="invalid network"):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ConfigError):
        Server("a", 0)


# --- HTTPRoutes attached to a server ---------------------------------------------------------


def _route(name: str, *matches: HttpMatch, identities: tuple[str, ...] = ()) -> HttpRoute:
    authz = (Authorization(f"{name}-authz", identities),) if identities else ()
    return HttpRoute(name, matches, authz)


def _decide(server: Server, identity: str | None, method: str, target: str, **headers: str):  # type: ignore[no-untyped-def]
    return authorize_request(server, identity, LOCAL, method, target, headers)


def test_route_authorizations_are_added_to_the_servers() -> None:
    server = Server(
        "app",
        8080,
        (Authorization("ops", ("*.infra.serviceaccount.identity.trustmesh.cluster.local",)),),
        (
            _route("public", HttpMatch(PathMatch("PathPrefix", "/public")), identities=("*",)),
            _route("rest", HttpMatch(PathMatch("PathPrefix", "/"))),
        ),
    )
    allowed = _decide(server, WEB, "GET", "/public/x")
    assert allowed.allowed and allowed.route == "public" and allowed.authorization == "public-authz"
    denied = _decide(server, WEB, "GET", "/private")
    assert not denied.allowed and denied.route == "rest" and not denied.no_route
    assert denied.reason == f"client {WEB} from {LOCAL} is not authorized on server app route rest"
    ops = "ops.infra.serviceaccount.identity.trustmesh.cluster.local"
    assert _decide(server, ops, "GET", "/private").authorization == "ops"  # server-level
    # connection-level authorize() ignores routes: only the server's own authorizations
    assert not authorize(InboundPolicy(servers=(server,)), 8080, WEB, LOCAL).allowed


def test_a_request_no_route_matches_is_not_found() -> None:
    server = Server(
        "app",
        8080,
        (Authorization("all", ("*",)),),
        (_route("api", HttpMatch(PathMatch("Exact", "/api"), method="POST")),),
    )
    assert _decide(server, WEB, "POST", "/api").allowed
    for method, target in (("GET", "/api"), ("POST", "/api/v2"), ("POST", "/")):
        d = _decide(server, WEB, method, target)
        assert d.no_route and not d.allowed
        assert d.reason == f"no HTTPRoute of server app matches {method} {target}"
    assert _decide(Server("bare", 8080, ()), WEB, "GET", "/").reason == (
        "server bare denies every client"
    )


def test_the_most_specific_match_wins() -> None:
    exact = HttpMatch(PathMatch("Exact", "/a/b"))
    regex = HttpMatch(PathMatch("RegularExpression", "/a/.*"))
    long_prefix = HttpMatch(PathMatch("PathPrefix", "/a/b"))
    short_prefix = HttpMatch(PathMatch("PathPrefix", "/a"))
    method = HttpMatch(PathMatch("PathPrefix", "/a"), method="GET")
    header = HttpMatch(
        PathMatch("PathPrefix", "/a"), method="GET", headers=(ValueMatch("x-canary", "1"),)
    )
    query = HttpMatch(
        PathMatch("PathPrefix", "/a"),
        method="GET",
        headers=(ValueMatch("x-canary", "1"),),
        query_params=(ValueMatch("v", "2"),),
    )
    everything = HttpMatch()
    routes = [
        _route(n, m)
        for n, m in (
            ("everything", everything),
            ("query", query),
            ("header", header),
            ("method", method),
            ("short", short_prefix),
            ("long", long_prefix),
            ("regex", regex),
            ("exact", exact),
        )
    ]
    server = Server("app", 8080, (Authorization("all", ("*",)),), tuple(routes))
    assert server.needs_headers

    def route(method_: str, target: str, **headers: str) -> str | None:
        return _decide(server, WEB, method_, target, **headers).route

    assert route("GET", "/a/b") == "exact"
    assert route("GET", "/a/b/c") == "regex"  # regex ranks above any prefix
    assert route("GET", "/a/x?v=2", **{"X-Canary": "1"}) == "regex"
    assert route("GET", "/a?v=2", **{"X-Canary": "1"}) == "query"
    assert route("GET", "/a", **{"X-Canary": "1"}) == "header"
    assert route("GET", "/a") == "method"
    assert route("PUT", "/a") == "short"
    assert route("PUT", "/b") == "everything"
    # query values are compared form-decoded; a repeated parameter reports the route of its
    # first value (authorization must hold for the last one too: test_policy_requests.py)
    assert route("GET", "/a?v=%32", **{"X-Canary": "1"}) == "query"
    assert route("GET", "/a?w=1&v=2&v=3", **{"X-Canary": "1"}) == "query"
    assert route("GET", "/a?v=3&v=2", **{"X-Canary": "1"}) == "header"
    # a tie goes to the first route listed (destination lists them by name)
    tie = Server("app", 8080, (), (_route("first", short_prefix), _route("second", short_prefix)))
    assert _decide(tie, WEB, "GET", "/a").route == "first"


def test_routes_are_validated() -> None:
    with pytest.raises(ConfigError, match="route name"):
        HttpRoute("")
    with pytest.raises(TypeError, match="tuples"):
        HttpRoute("r", [HttpMatch()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="routes must be a tuple"):
        Server("s", 80, (), [HttpRoute("r")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        (b"/a/b?x=1", "/a/b?x=1"),
        (b"http://api.shop:8080/a?x=1", "/a?x=1"),
        (b"http://api.shop", "/"),
        (b"*", "*"),
        (b"api.shop:443", "api.shop:443"),
        (b"/redirect?to=http://x/y", "/redirect?to=http://x/y"),
        # the authority ends at '?' or '#' too: the path of these is "/" for the application
        (b"http://api.shop?x=/public/y", "/?x=/public/y"),
        (b"http://api.shop#/public", "/#/public"),
        (b"http://api.shop:8080?a=1", "/?a=1"),
    ],
)
def test_request_path(url: bytes, path: str) -> None:
    assert request_path(url) == path
