"""ProxyMetrics: in-place counters (Count, HttpSeries) render exactly as dict increments do."""

from __future__ import annotations

import random

from proxy.metrics import ProxyMetrics


def _events(rng: random.Random) -> list[tuple[tuple[str, ...], int, float]]:
    """Requests as (request_total labels, status, latency ms); status 0: no response."""
    authorities = ("api", "api:80", "web.ns.svc", 'we"ird\\name')
    events = []
    for _ in range(500):
        labels = (
            rng.choice(("inbound", "outbound")),
            rng.choice(authorities),
            rng.choice(("true", "no_identity", "")),
            rng.choice(("", "web.ns.serviceaccount.identity.trustmesh.cluster.local")),
            rng.choice(("", "api.ns.serviceaccount.identity.trustmesh.cluster.local")),
        )
        status = rng.choice((0, 200, 200, 204, 403, 404, 502, 503))
        events.append((labels, status, rng.choice((0.2, 1.0, 4.5, 37.0, 999.9, 60000.0))))
    return events


def test_series_and_counts_render_like_dict_increments() -> None:
    events = _events(random.Random(7))
    by_dict, in_place = ProxyMetrics(), ProxyMetrics()
    for labels, status, ms in events:
        by_dict.request_total.inc(labels)
        series = in_place.http_series(labels)
        series.requests.n += 1
        if status:
            code = str(status)
            kind = "failure" if status >= 500 else "success"
            by_dict.response_total.inc((*labels, code, kind))
            by_dict.response_latency_ms.observe((labels[0], labels[1], code), ms)
            series.respond(status, ms)
        allow = ("8080", "default:all-unauthenticated", labels[2], labels[3], "", "any")
        by_dict.inbound_http_authz_allow_total.inc(allow)
        in_place.inbound_http_authz_allow_total.count(allow).n += 1
    text = by_dict.render()
    assert text == in_place.render()
    assert (
        'response_latency_ms_bucket{direction="inbound",authority="api",status_code="200",le="5.0"}'
        in text
    )
    # Both ways of counting add up in one family.
    in_place.request_total.inc(events[0][0])
    assert in_place.request_total.get(events[0][0]) == by_dict.request_total.get(events[0][0]) + 1
    assert in_place.render().count("\nrequest_total{") == text.count("\nrequest_total{")


def test_unused_counters_are_not_shown() -> None:
    m = ProxyMetrics()
    m.http_series(("inbound", "api", "true", "", ""))
    m.inbound_http_authz_allow_total.count(("8080", "srv", "true", "", "", "authz"))
    text = m.render()
    assert "request_total{" not in text and "inbound_http_authz_allow_total{" not in text
