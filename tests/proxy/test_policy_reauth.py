"""Re-deciding open connections under a changed policy (proxy.policy.reauthorize): a TCP relay
by the server's authorizations, an upgraded HTTP connection by its upgrade request's facts,
routes included."""

from __future__ import annotations

import ipaddress

import pytest

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.policy import (
    Authorization,
    DefaultPolicy,
    HttpRoute,
    InboundPolicy,
    RequestFacts,
    Server,
    reauthorize,
)

WEB = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
OPS = "ops.infra.serviceaccount.identity.trustmesh.cluster.local"
LOCAL = ipaddress.ip_address("10.1.2.3")
UPGRADE = RequestFacts("GET", "/ws?room=a", (("host", "api"), ("x-room", "a")))


def _routed(web_on_ws: bool) -> InboundPolicy:
    ws = HttpRoute(
        "ws",
        (HttpMatch(PathMatch("Exact", "/ws"), headers=(ValueMatch("x-room", "a"),)),),
        (Authorization("web", (WEB,)),) if web_on_ws else (Authorization("ops", (OPS,)),),
    )
    rest = HttpRoute(
        "rest", (HttpMatch(PathMatch("PathPrefix", "/")),), (Authorization("web", (WEB,)),)
    )
    return InboundPolicy(DefaultPolicy.DENY, (Server("app", 8080, (), (ws, rest)),))


def test_an_upgraded_connection_is_judged_by_the_route_its_request_matched() -> None:
    assert reauthorize(_routed(True), 8080, WEB, LOCAL, UPGRADE).route == "ws"
    denied = reauthorize(_routed(False), 8080, WEB, LOCAL, UPGRADE)
    assert not denied.allowed and denied.route == "ws" and not denied.no_route
    assert "route ws" in denied.reason
    # the same client as TCP is judged by the server's own authorizations (none here)
    assert not reauthorize(_routed(True), 8080, WEB, LOCAL, None).allowed


def test_every_reading_of_the_upgrade_request_must_stay_authorized() -> None:
    """A repeated header is judged by its first and its last value, as for the request."""
    twice = RequestFacts("GET", "/ws", (("x-room", "a"), ("x-room", "b")))
    assert reauthorize(_routed(True), 8080, WEB, LOCAL, twice).allowed
    assert not reauthorize(_routed(False), 8080, WEB, LOCAL, twice).allowed
    encoded = RequestFacts("GET", "/%77s", (("x-room", "a"),))  # read as /ws by apps
    assert not reauthorize(_routed(False), 8080, WEB, LOCAL, encoded).allowed


def test_a_route_gone_denies_as_no_route() -> None:
    only_other = InboundPolicy(
        DefaultPolicy.DENY,
        (
            Server(
                "app",
                8080,
                (),
                (HttpRoute("other", (HttpMatch(PathMatch("Exact", "/other")),)),),
            ),
        ),
    )
    decision = reauthorize(only_other, 8080, WEB, LOCAL, UPGRADE)
    assert not decision.allowed and decision.no_route


def test_without_routes_an_upgraded_connection_is_judged_as_its_client() -> None:
    allow = InboundPolicy(DefaultPolicy.DENY, (Server("app", 8080, (Authorization("w", (WEB,)),)),))
    assert reauthorize(allow, 8080, WEB, LOCAL, UPGRADE).allowed
    assert not reauthorize(allow, 8080, OPS, LOCAL, UPGRADE).allowed
    assert not reauthorize(allow, 8080, None, LOCAL, UPGRADE).allowed
    # the port losing its Server falls back to the default policy
    assert not reauthorize(InboundPolicy(DefaultPolicy.DENY), 8080, WEB, LOCAL, UPGRADE).allowed
    assert reauthorize(InboundPolicy(), 8080, None, LOCAL, UPGRADE).allowed


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("", "/ws"), ValueError),
        ((b"GET", "/ws"), TypeError),
        (("GET", "/ws", [("host", "api")]), TypeError),
        (("GET", "/ws", (("host",),)), TypeError),
    ],
)
def test_request_facts_refuse_bad_values(args: tuple[object, ...], error: type) -> None:
    with pytest.raises(error):
        RequestFacts(*args)  # type: ignore[arg-type]
