"""Outbound policy: routes, weighted backends, timeouts and retries from HTTPRoute and annotations."""

from __future__ import annotations

from datetime import timedelta

import pytest
from destination_testlib import WEB

from destination.decode import OUTBOUND_POLICY, outbound_from_proto
from destination.errors import InvalidResource, NotFound
from destination.meshfile import load_mesh_text
from destination.outbound import resolve_outbound
from destination.paths import parse_authority
from destination.policy import Protocol
from destination.resources import MeshSettings
from destination.wire import outbound_to_proto
from protos import lite

ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-split
  namespace: default
  annotations: {retry.linkerd.io/http: "5xx,429", retry.linkerd.io/limit: "3"}
spec:
  parentRefs: [{kind: Service, name: web, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, method: GET}]
    backendRefs: [{name: web, port: 8080, weight: 90}, {name: web-canary, port: 8080, weight: 10}]
    timeouts: {request: 2s, backendRequest: 500ms}
  - backendRefs: [{name: web, port: 8080}]
"""


def test_weighted_routes_timeouts_and_retries() -> None:
    st = load_mesh_text(WEB + ROUTE)
    p = resolve_outbound(st, MeshSettings(), parse_authority("web.default.svc.cluster.local:8080"))
    assert p.protocol is Protocol.DETECT
    rule = p.route_for("GET", "/api/items")
    assert rule is not None
    assert [(b.authority, b.weight) for b in rule.backends] == [
        ("web.default.svc.cluster.local:8080", 90),
        ("web-canary.default.svc.cluster.local:8080", 10),
    ]
    assert rule.timeouts.request == timedelta(seconds=2)
    assert rule.timeouts.response == timedelta(milliseconds=500)
    assert rule.retry is not None and rule.retry.max_retries == 3
    assert (
        rule.retry.retries_status(503)
        and rule.retry.retries_status(429)
        and not rule.retry.retries_status(404)
    )
    fallback = p.route_for("POST", "/api/items")
    assert fallback is not None and fallback.timeouts.request is None
    # the wire round trip is lossless, read by protobuf or by the sidecar's codec
    assert outbound_from_proto(outbound_to_proto(p)) == p
    raw = outbound_to_proto(p).SerializeToString()
    assert outbound_from_proto(lite.decode(OUTBOUND_POLICY, raw)) == p


@pytest.mark.parametrize("limit", ["x", "\u00b2", "9" * 5000])
def test_a_retry_limit_that_is_not_a_number_is_refused_by_name(limit: str) -> None:
    text = WEB + ROUTE.replace('retry.linkerd.io/limit: "3"', f'retry.linkerd.io/limit: "{limit}"')
    with pytest.raises(InvalidResource, match=r"retry\.linkerd\.io/limit\]: .* is not a number"):
        st = load_mesh_text(text)
        resolve_outbound(st, MeshSettings(), parse_authority("web.default.svc.cluster.local:8080"))


def test_default_route_opaque_and_unknown() -> None:
    st = load_mesh_text(
        WEB.replace(
            "{name: web, namespace: default}",
            "{name: web, namespace: default, annotations: {config.linkerd.io/opaque-ports: '8080'}}",
        )
    )
    p = resolve_outbound(st, MeshSettings(), parse_authority("web.default.svc.cluster.local:8080"))
    assert p.protocol is Protocol.OPAQUE and p.routes[0].ref.name == "opaq"
    with pytest.raises(NotFound):
        resolve_outbound(st, MeshSettings(), parse_authority("nope.default.svc.cluster.local:80"))
