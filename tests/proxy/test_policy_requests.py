"""Route authorization against requests that say one thing to the proxy and another to the
application: encoded or dotted paths, repeated headers and query parameters, peer addresses
written as IPv4-mapped IPv6."""

from __future__ import annotations

import ipaddress

import pytest

from destination.policy import HttpMatch, PathMatch, ValueMatch
from proxy.inbound import listener_ports
from proxy.policy import (
    Authorization,
    HttpRoute,
    Server,
    authorize_request,
    client_address,
    path_readings,
)

WEB = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
OPS = "ops.infra.serviceaccount.identity.trustmesh.cluster.local"
LOCAL = ipaddress.ip_address("10.1.2.3")


def _prefix(value: str) -> HttpMatch:
    return HttpMatch(PathMatch("PathPrefix", value))


# /admin is for ops only; everything else for any meshed client.
ADMIN = Server(
    "app",
    8080,
    (),
    (
        HttpRoute("admin", (_prefix("/admin"),), (Authorization("ops", (OPS,)),)),
        HttpRoute("rest", (_prefix("/"),), (Authorization("anyone", ("*",)),)),
    ),
)


@pytest.mark.parametrize(
    "target",
    [
        "/%61dmin",  # an unreserved character percent-encoded
        "/%61%64%6D%69%6E/users",
        "//admin",  # servers that merge slashes
        "/x/../admin",  # servers that remove dot segments
        "/x/%2e%2e/admin",
        "/./admin/",
        "/x%2F..%2Fadmin",  # servers that decode %2F before routing
        "/x\\..\\admin",  # servers that take a backslash for a slash
        "/admin;jsessionid=1",  # servlet containers drop path parameters
        "/x/..;/admin",
        "/%2561dmin/../admin",
        "/admin#x",  # servers that cut a fragment off
        "/admin#x?y=1",
    ],
)
def test_a_path_written_differently_does_not_escape_its_route(target: str) -> None:
    web = authorize_request(ADMIN, WEB, LOCAL, "GET", target, {})
    assert not web.allowed and web.route == "admin" and not web.no_route, target
    assert authorize_request(ADMIN, OPS, LOCAL, "GET", target, {}).allowed


@pytest.mark.parametrize(
    "target", ["/administrator", "/public/a%20b", "/x//y", "/a/./b?x=%2Fadmin", "/files/v1.2/x"]
)
def test_ordinary_paths_are_still_routed(target: str) -> None:
    decision = authorize_request(ADMIN, WEB, LOCAL, "GET", target, {})
    assert decision.allowed and decision.route == "rest"


def test_a_dotted_path_cannot_leave_the_routes_a_server_has() -> None:
    """Only /public is routed: a path an application resolves elsewhere is not found, even
    when its text starts with /public."""
    server = Server(
        "app",
        8080,
        (),
        (HttpRoute("public", (_prefix("/public"),), (Authorization("anyone", ("*",)),)),),
    )
    assert authorize_request(server, WEB, LOCAL, "GET", "/public/x", {}).allowed
    for target in ("/public/../secret", "/public/%2e%2e/secret", "/public%2F..%2Fsecret"):
        decision = authorize_request(server, WEB, LOCAL, "GET", target, {})
        assert not decision.allowed and decision.no_route, target


def test_path_readings() -> None:
    assert path_readings("/plain/path") == ("/plain/path",)
    readings = path_readings("/x/%2e%2e//%61dmin")
    assert readings[0] == "/x/%2e%2e//%61dmin"  # as sent comes first
    assert {"/admin", "/x/..//admin", "/x/../admin"} <= set(readings)


def test_repeated_headers_and_query_parameters_must_agree() -> None:
    """Applications read the first or the last of a repeated header or parameter: a request
    is authorized only if it would be either way."""
    canary = HttpMatch(_prefix("/").path, headers=(ValueMatch("x-env", "canary"),))
    public = HttpMatch(_prefix("/").path, query_params=(ValueMatch("mode", "public"),))
    server = Server(
        "app",
        8080,
        (),
        (
            HttpRoute("canary", (canary,), (Authorization("anyone", ("*",)),)),
            HttpRoute("public-mode", (public,), (Authorization("anyone", ("*",)),)),
            HttpRoute("rest", (_prefix("/"),), (Authorization("ops", (OPS,)),)),
        ),
    )
    assert authorize_request(server, WEB, LOCAL, "GET", "/", [("X-Env", "canary")]).allowed
    for pairs in (
        [("x-env", "prod"), ("x-env", "canary")],
        [("x-env", "canary"), ("X-ENV", "prod")],
    ):
        assert not authorize_request(server, WEB, LOCAL, "GET", "/", pairs).allowed, pairs
    both = [("x-env", "canary"), ("x-env", "canary")]
    assert authorize_request(server, WEB, LOCAL, "GET", "/", both).allowed
    assert authorize_request(server, WEB, LOCAL, "GET", "/?mode=public", {}).allowed
    for query in ("mode=admin&mode=public", "mode=public&mode=admin", "mode=public&mode"):
        decision = authorize_request(server, WEB, LOCAL, "GET", f"/?{query}", {})
        assert not decision.allowed and decision.route == "rest", query
    assert authorize_request(server, OPS, LOCAL, "GET", "/?mode=public&mode=admin", {}).allowed


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address(peer: str, address: str) -> None:
    assert client_address(peer) == ipaddress.ip_address(address)


def test_an_ipv4_mapped_client_is_judged_as_ipv4() -> None:
    """A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d: an IPv4 network excluded
    from an authorization stays excluded, and an IPv4 network allowed stays allowed."""
    nets = (
        *tuple(
            ipaddress.ip_network("0.0.0.0/0").address_exclude(ipaddress.ip_network("10.0.0.0/8"))
        ),
        ipaddress.ip_network("::/0"),
    )
    server = Server("app", 8080, (Authorization("outside", networks=nets, unauthenticated=True),))
    mapped = client_address("::ffff:10.0.0.1")
    assert not authorize_request(server, None, mapped, "GET", "/", {}).allowed
    inside = Server(
        "app",
        8080,
        (
            Authorization(
                "inside", networks=(ipaddress.ip_network("10.0.0.0/8"),), unauthenticated=True
            ),
        ),
    )
    assert authorize_request(inside, None, mapped, "GET", "/", {}).allowed


def test_listener_ports_reached_from_the_application_host() -> None:
    bound = [("127.0.0.1", 4140), ("0.0.0.0", 4143), ("::1", 4191), ("10.0.0.5", 4190)]
    assert listener_ports(bound, "127.0.0.1") == {4140, 4143, 4191}
    assert listener_ports(bound, "localhost") == {4140, 4143, 4191}
    assert listener_ports(bound, "10.0.0.5") == {4143, 4190}


@pytest.mark.parametrize(
    ("pattern", "identity", "matches"),
    [
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", WEB, True),
        # Linkerd's suffixes span any number of labels: *.cluster.local is the trust domain
        ("*.cluster.local", WEB, True),
        ("*.identity.trustmesh.cluster.local", WEB, True),
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", OPS, False),
        # on a label boundary, never the suffix itself, exact case, no trailing dot
        (
            "*.serviceaccount.identity.trustmesh.cluster.local",
            "evilserviceaccount.identity.trustmesh.cluster.local",
            False,
        ),
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", WEB[4:], False),
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", "." + WEB[4:], False),
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", WEB.upper(), False),
        ("*.shop.serviceaccount.identity.trustmesh.cluster.local", WEB + ".", False),
        (WEB, WEB.upper(), False),
        ("*", WEB, True),
    ],
)
def test_identity_patterns(pattern: str, identity: str, matches: bool) -> None:
    server = Server("app", 8080, (Authorization("a", (pattern,)),))
    assert authorize_request(server, identity, LOCAL, "GET", "/", {}).allowed is matches
    assert not authorize_request(server, None, LOCAL, "GET", "/", {}).allowed  # no identity
