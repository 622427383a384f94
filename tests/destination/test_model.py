"""Endpoint sets, diffs and the wire encoding: diff then apply reproduces the new set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from destination.decode import UPDATE, endpoint_from_proto, update_from_proto
from destination.errors import InvalidTarget
from destination.model import Add, Change, Endpoint, EndpointSet, NoEndpoints, Remove, apply, diff
from destination.paths import parse_authority, parse_workload_ref
from destination.wire import endpoint_to_proto, update_to_proto
from protos import lite

A = "web.default.svc.cluster.local:8080"

endpoints = st.builds(
    Endpoint,
    address=st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1", "127.0.0.1"]),
    port=st.sampled_from([80, 8080]),
    weight=st.sampled_from([1, 10000]),
    identity=st.sampled_from([None, "a.b.serviceaccount.identity.trustmesh.cluster.local"]),
    protocol_hint=st.sampled_from([None, "h2", "opaque"]),
)
sets = st.builds(
    lambda eps, exists: EndpointSet(
        A, tuple({e.key: e for e in eps}.values()) if exists else (), exists
    ),
    st.lists(endpoints, max_size=6),
    st.booleans(),
)


def sent(change: Change) -> lite.Message:
    """``change`` as the service encodes it (protobuf) and the sidecar reads it (protos.lite)."""
    return lite.decode(UPDATE, update_to_proto(change).SerializeToString())


@given(sets, sets)
def test_diff_then_apply_reaches_the_new_set(old: EndpointSet, new: EndpointSet) -> None:
    current = EndpointSet(A)
    for change in diff(None, old):
        current = apply(current, update_from_proto(sent(change)))
    assert current.endpoints == old.endpoints
    for change in diff(old, new):
        current = apply(current, update_from_proto(sent(change)))
    assert current.endpoints == new.endpoints
    if not new.endpoints:
        assert current.exists == new.exists or (old.endpoints == () and old.exists == new.exists)


def test_first_message_is_add_or_no_endpoints() -> None:
    e = Endpoint("10.0.0.1", 80)
    assert diff(None, EndpointSet(A, (e,))) == (Add((e,)),)
    assert diff(None, EndpointSet(A)) == (NoEndpoints(True),)
    assert diff(EndpointSet(A, (e,)), EndpointSet(A, (), False)) == (
        Remove((e.key,)),
        NoEndpoints(False),
    )


def test_endpoint_validation_and_ipv6_wire() -> None:
    with pytest.raises(ValueError, match="not an IP"):
        Endpoint("web", 80)
    with pytest.raises(ValueError, match="outside"):
        Endpoint("10.0.0.1", 0)
    e = Endpoint(
        "fd00::5",
        443,
        identity="x",
        server_name="x",
        protocol_hint="opaque",
        opaque_inbound_port=4143,
    )
    assert endpoint_from_proto(endpoint_to_proto(e)) == e
    raw = endpoint_to_proto(e).SerializeToString()
    assert endpoint_from_proto(lite.decode("io.linkerd.proxy.destination.WeightedAddr", raw)) == e


def test_paths_and_tokens() -> None:
    t = parse_authority("web.default.svc.cluster.local")
    assert (t.service, t.namespace, t.port) == ("web", "default", 80)
    assert parse_authority("web-0.web.default.svc.cluster.local.:8080").instance == "web-0"
    assert parse_workload_ref('{"ns":"shop","pod":"api-0","nodeName":"n1"}').name == "api-0"
    assert parse_workload_ref("ns:shop").namespace == "shop"
    assert parse_workload_ref("shop:api-0").name == "api-0"
    # str.isdigit() takes these; int() does not (a ValueError escaped the handler before)
    for port in ("\u00b2", "0" * 40 + "80"):
        with pytest.raises(InvalidTarget, match=r"is not a number in 1\.\.65535"):
            parse_authority(f"web.default.svc.cluster.local:{port}")
    for bad in ("{not json", "justtext", '{"ns": "Bad_NS"}'):
        with pytest.raises(InvalidTarget):
            parse_workload_ref(bad)
    # messages quote at most 80 characters of what the client sent
    with pytest.raises(InvalidTarget, match=r"is not a DNS-1123 label$") as e:
        parse_workload_ref(f'{{"ns": "shop", "pod": "{"X" * 5000}"}}')
    assert "... (5000 characters)" in str(e.value) and len(str(e.value)) < 200
