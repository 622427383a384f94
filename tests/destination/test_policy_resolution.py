"""Inbound policy edge cases a hostile or sloppy configuration meets: HTTPRoute rules and
parents, IPv4-mapped clients, and authorization kinds a proxy does not know."""

from __future__ import annotations

import dataclasses

from test_inbound import SERVER, SETTINGS, WEB_ID, authz, state

from destination.decode import INBOUND_POLICY, inbound_from_proto
from destination.inbound import resolve_inbound
from destination.policy import (
    ALL_NETWORKS,
    UNAUTHENTICATED,
    Authorization,
    HttpMatch,
    Network,
    Ref,
)
from destination.wire import inbound_to_proto
from protos import lite
from protos import policy_pb2 as ppb

ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs: [{parent}]
  rules: {rules}
"""


def test_a_rule_without_matches_matches_every_request() -> None:
    """Gateway API: a rule with no matches is PathPrefix / (it was dropped when another rule
    of the route had matches, and its requests then found no route)."""
    rules = "[{matches: [{path: {type: Exact, value: /health}}]}, {backendRefs: []}]"
    route = ROUTE.format(name="all", parent="{kind: Server, name: api-http}", rules=rules)
    p = resolve_inbound(state(SERVER % "" + route), SETTINGS, "shop", "api-0", 8080)
    (r,) = p.routes
    assert HttpMatch() in r.matches
    assert any(m.path is not None and m.path.value == "/health" for m in r.matches)


def test_a_route_whose_parent_is_in_another_namespace_does_not_attach() -> None:
    elsewhere = "{kind: Server, name: api-http, namespace: other}"
    route = ROUTE.format(name="far", parent=elsewhere, rules="[{}]")
    p = resolve_inbound(state(SERVER % "" + route), SETTINGS, "shop", "api-0", 8080)
    assert p.routes == ()
    here = "{kind: Server, name: api-http, namespace: shop}"
    route = ROUTE.format(name="near", parent=here, rules="[{}]")
    p = resolve_inbound(state(SERVER % "" + route), SETTINGS, "shop", "api-0", 8080)
    assert [r.ref.name for r in p.routes] == ["near"]


def test_an_ipv4_mapped_client_is_judged_as_ipv4() -> None:
    outside = Network.parse("0.0.0.0/0", ("10.0.0.0/8",))
    a = Authorization(Ref("x", "y"), (outside, Network.parse("::/0")), UNAUTHENTICATED)
    assert not a.permits("::ffff:10.1.2.3", False, None)
    assert a.permits("::ffff:192.0.2.1", False, None)
    inside = Authorization(Ref("x", "y"), (Network.parse("10.0.0.0/8"),), UNAUTHENTICATED)
    assert inside.permits("::ffff:10.1.2.3", False, None)


def test_an_authentication_the_proxy_does_not_know_authorizes_nobody() -> None:
    """A newer destination may send an authentication kind this proxy cannot read (the oneof
    arrives unset): it must not read as 'unauthenticated', which admits everyone."""
    st = state(SERVER % "" + authz("Server", "api-http", ("NetworkAuthentication", "none")))
    p = resolve_inbound(st, SETTINGS, "shop", "api-0", 8080)
    msg = inbound_to_proto(p)
    msg.authorizations.append(
        ppb.Authorization(networks=[ppb.Network(cidr="0.0.0.0/0"), ppb.Network(cidr="::/0")])
    )
    (back,) = inbound_from_proto(msg).authorizations
    assert not back.permits("10.1.2.3", True, WEB_ID)
    assert not back.permits("10.1.2.3", False, None)
    (back,) = inbound_from_proto(
        lite.decode(INBOUND_POLICY, msg.SerializeToString())
    ).authorizations
    assert not back.permits("10.1.2.3", True, WEB_ID)
    # the known kinds still read back as they were sent
    open_ = Authorization(Ref("default", "all-unauthenticated"), ALL_NETWORKS, UNAUTHENTICATED)
    msg.authorizations.append(
        inbound_to_proto(dataclasses.replace(p, authorizations=(open_,))).authorizations[0]
    )
    assert inbound_from_proto(msg).authorizations[1].permits("10.1.2.3", False, None)
    sent = lite.decode(INBOUND_POLICY, msg.SerializeToString())
    assert inbound_from_proto(sent).authorizations[1].permits("10.1.2.3", False, None)


def test_two_servers_on_one_port_resolve_the_same_whatever_their_order() -> None:
    """Linkerd's webhook refuses overlapping Servers (the oldest wins if they exist anyway);
    the model has no creation times, so the first by name governs, independent of order."""
    deny = SERVER.replace("api-http", "b-deny") % ""
    allow = SERVER.replace("api-http", "a-open") % ", accessPolicy: all-unauthenticated"
    for text in (deny + allow, allow + deny):
        p = resolve_inbound(state(text), SETTINGS, "shop", "api-0", 8080)
        assert p.server.name == "a-open" and p.permits("203.0.113.1", False, None)
