"""Inbound authorization: default policies, servers, identity patterns and networks."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.errors import ConfigError
from proxy.policy import (
    Authorization,
    DefaultPolicy,
    InboundPolicy,
    Server,
    authorize,
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
