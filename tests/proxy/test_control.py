"""The control-plane adapters' pure conversions (destination values -> proxy values) and the
trust-anchor source; the adapters against live services are covered in tests/e2e/test_mesh_*."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from destination import policy as dp
from destination.model import Endpoint as DEndpoint
from destination.model import EndpointSet
from pki.bundle import TrustBundle
from proxy.control import (
    TrustAnchors,
    authorization_of,
    canonical_authority,
    networks_of,
    server_of,
    service_of,
)
from proxy.errors import ConfigError
from proxy.policy import InboundPolicy, authorize, authorize_request
from proxy.routes import ServiceProtocol

ID = "web.shop.serviceaccount.identity.trustmesh.cluster.local"
OTHER = "db.shop.serviceaccount.identity.trustmesh.cluster.local"


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("web", "web.shop.svc.cluster.local:80"),
        ("web:8080", "web.shop.svc.cluster.local:8080"),
        ("WEB.other:81", "web.other.svc.cluster.local:81"),
        ("web.other.svc", "web.other.svc.cluster.local:80"),
        ("web.other.svc.cluster.local.:9", "web.other.svc.cluster.local:9"),
        ("127.0.0.1:8080", None),
        ("[::1]:80", None),
        # Two labels are <svc>.<ns>, as a cluster DNS search path reads them.
        ("example.com", "example.com.svc.cluster.local:80"),
        ("www.example.com", None),
        ("web:99999", None),
        ("web:", None),
        ("", None),
        # str.isdigit() takes these; int() does not (a ValueError escaped before)
        ("web:\u00b2", None),
        ("web:" + "1" * 5000, None),
    ],
)
def test_canonical_authority(authority: str, expected: str | None) -> None:
    assert canonical_authority(authority, "shop") == expected


def test_networks_minus_exceptions() -> None:
    nets = networks_of((dp.Network.parse("10.0.0.0/8", ("10.9.0.0/16",)), dp.ALL_NETWORKS[1]))
    inside = [n for n in nets if ipaddress.ip_address("10.1.2.3") in n]
    excepted = [n for n in nets if ipaddress.ip_address("10.9.1.1") in n]
    assert inside and not excepted
    assert any(ipaddress.ip_address("::1") in n for n in nets)
    assert sum(n.num_addresses for n in nets if n.version == 4) == 2**24 - 2**16


def _policy(*authz: dp.Authorization, kind: str = "Server", audit: bool = False):
    return dp.InboundPolicy(
        "shop", "api-0", 8080, dp.Ref(kind, "api-http"), dp.Protocol.HTTP1, authz, audit=audit
    )


def _authz(name: str, auth: dp.Authentication, *nets: dp.Network) -> dp.Authorization:
    return dp.Authorization(dp.Ref("AuthorizationPolicy", name), nets or dp.ALL_NETWORKS, auth)


def test_identity_authorization_maps_to_the_same_decisions() -> None:
    authz = _authz("web-only", dp.Authentication(dp.AuthKind.IDENTITIES, (ID,)))
    server = server_of(_policy(authz))
    assert server.name == "api-http" and server.port == 8080
    policy = InboundPolicy(servers=(server,))
    ip = ipaddress.ip_address("127.0.0.1")
    for identity in (ID, OTHER, None):
        ours = authorize(policy, 8080, identity, ip).allowed
        theirs = authz.permits("127.0.0.1", identity is not None, identity)
        assert ours == theirs, identity
    denied = authorize(policy, 8080, OTHER, ip)
    assert not denied.allowed and "api-http" in denied.reason and OTHER in denied.reason


def test_unauthenticated_tls_network_and_audit() -> None:
    assert authorization_of(_authz("open", dp.UNAUTHENTICATED)).unauthenticated
    tls = authorization_of(_authz("tls", dp.Authentication(dp.AuthKind.TLS)))
    assert tls.identities == ("*",) and not tls.unauthenticated
    net = authorization_of(_authz("lan", dp.UNAUTHENTICATED, dp.Network.parse("10.0.0.0/8")))
    assert net.admits(None, ipaddress.ip_address("10.0.0.1"))
    assert not net.admits(None, ipaddress.ip_address("192.168.0.1"))
    # A Server without authorizations denies everyone; audit mode admits everyone.
    ip = ipaddress.ip_address("127.0.0.1")
    assert not authorize(InboundPolicy(servers=(server_of(_policy()),)), 8080, ID, ip).allowed
    audit = server_of(_policy(audit=True))
    assert authorize(InboundPolicy(servers=(audit,)), 8080, None, ip).allowed
    assert server_of(_policy(kind="default")).name == "default:api-http"


def test_service_of_endpoint_sets() -> None:
    meshed = DEndpoint(
        "127.0.0.1", 18080, identity=ID, protocol_hint="h2", opaque_inbound_port=4143
    )
    plain = DEndpoint("127.0.0.2", 18080)
    svc = service_of(EndpointSet("web.shop.svc.cluster.local:80", (meshed, plain)))
    assert svc.protocol is ServiceProtocol.HTTP1
    by_host = {e.host: e for e in svc.endpoints}
    assert by_host["127.0.0.1"].identity == ID and by_host["127.0.0.1"].proxy_port == 4143
    assert not by_host["127.0.0.2"].meshed
    opaque = DEndpoint("127.0.0.1", 7000, identity=ID, protocol_hint="opaque")
    svc = service_of(EndpointSet("echo.shop.svc.cluster.local:7000", (opaque,)))
    assert svc.protocol is ServiceProtocol.OPAQUE
    assert svc.endpoints[0].proxy_port == 7000  # no opaque-transport port: the target itself


def test_trust_anchors_follow_the_file_and_keep_the_last_good_bundle(
    tmp_path: Path, make_store
) -> None:
    first = make_store(name="a").trust_bundle()
    second = make_store(name="b").trust_bundle()
    path = tmp_path / "anchors.pem"
    path.write_bytes(first.pem())
    now = [0.0]
    anchors = TrustAnchors(path, clock=lambda: now[0], interval=1.0)
    assert anchors.current().digest == first.digest
    path.write_bytes(second.pem())
    os.utime(path, ns=(1, 10**9))  # a different mtime, whatever the clock granularity
    assert anchors.current().digest == first.digest  # not re-checked before the interval
    now[0] = 1.5
    assert anchors.current().digest == second.digest
    path.write_bytes(b"not a certificate")
    os.utime(path, ns=(1, 2 * 10**9))
    now[0] = 3.0
    assert anchors.current().digest == second.digest
    anchors.replace(TrustBundle.from_pem(first.pem()), "destination")
    assert anchors.current().digest == first.digest and anchors.source == "destination"


def test_trust_anchors_that_cannot_be_read_at_start_are_named(tmp_path: Path) -> None:
    """The proxy's startup error named neither the file nor the problem in words (it was
    cryptography's FAQ link and ``MalformedFraming``)."""
    garbage = tmp_path / "anchors.pem"
    garbage.write_bytes(b"not a certificate")
    for path, problem in (
        (garbage, "no valid PEM certificate found: no complete BEGIN/END CERTIFICATE block"),
        (tmp_path / "missing.pem", "No such file or directory"),
    ):
        with pytest.raises(ConfigError) as e:
            TrustAnchors(path, clock=lambda: 0.0)
        assert str(e.value) == f"trust anchors {path}: {problem}"


def test_httproutes_from_destination_decide_per_request() -> None:
    route = dp.InboundRoute(
        dp.Ref("HTTPRoute", "admin", "shop", "gateway.networking.k8s.io"),
        (dp.HttpMatch(dp.PathMatch("PathPrefix", "/admin")),),
        (_authz("ops-only", dp.Authentication(dp.AuthKind.IDENTITIES, (OTHER,))),),
    )
    policy = dataclasses.replace(
        _policy(_authz("web", dp.Authentication(dp.AuthKind.IDENTITIES, (ID,)))), routes=(route,)
    )
    server = server_of(policy)
    assert [r.name for r in server.routes] == ["admin"]
    assert server.routes[0].authorizations[0].identities == (OTHER,)
    ip = ipaddress.ip_address("127.0.0.1")
    on_route = authorize_request(server, OTHER, ip, "GET", "/admin/users", {})
    assert on_route.allowed and on_route.route == "admin"
    assert authorize_request(server, ID, ip, "GET", "/admin", {}).allowed  # server-level
    assert authorize_request(server, ID, ip, "GET", "/other", {}).no_route
    # audit mode admits every request, routes or not
    audit = server_of(dataclasses.replace(policy, audit=True))
    assert not audit.routes
    assert authorize_request(audit, None, ip, "GET", "/other", {}).allowed
