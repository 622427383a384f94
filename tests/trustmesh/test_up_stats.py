"""Reading proxy metrics for the live table: quantiles, the parse of a real ProxyMetrics
exposition, rows and the rich table."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from proxy.metrics import ProxyMetrics
from trustmesh.up.stats import histogram_quantile, mesh_tls_groups, parse_proxy_metrics
from trustmesh.up.view import expires_in, render_table, workload_rows


def test_histogram_quantile() -> None:
    buckets = [(1.0, 0.0), (2.0, 50.0), (5.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == 2.0
    assert histogram_quantile(0.25, buckets) == pytest.approx(1.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(4.94)
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 4.0)]) == 1.0  # only +Inf: lower bound
    assert histogram_quantile(0.5, [(math.inf, 0.0)]) is None
    with pytest.raises(ValueError, match="outside"):
        histogram_quantile(1.5, buckets)


class _FakeLink:  # only the two counters ProxyMetrics reads from a live link
    bytes_in = 10
    bytes_out = 20


def _metrics() -> str:
    m = ProxyMetrics()
    labels = (
        "inbound",
        "web:80",
        "true",
        "client.ns.serviceaccount.identity.trustmesh.cluster.local",
        "",
    )
    for status, latency in ((200, 3.0), (200, 7.0), (503, 40.0)):
        m.response_total.inc((*labels, str(status), "failure" if status >= 500 else "success"))
        m.response_latency_ms.observe(("inbound", "web:80", str(status)), latency)
    m.tls_handshakes_total.inc(("inbound", "X25519MLKEM768", "ok"), 3)
    m.tls_handshakes_total.inc(("outbound", "X25519MLKEM768", "ok"), 2)
    m.tls_handshakes_total.inc(("inbound", "X25519", "kex_refused"))
    m.opened(_FakeLink(), ("inbound", "src", "true", "c", ""))
    extra = (
        "identity_cert_expiration_timestamp_seconds 1000.0\n"
        'trustmesh_proxy_identity_info{identity="web.ns.serviceaccount.identity.trustmesh.cluster.local",ready="1"} 1.0\n'
        'trustmesh_proxy_trust_bundle_info{digest="abc",source="destination"} 1.0\n'
    )
    return m.render() + extra


def test_parse_a_real_exposition() -> None:
    s = parse_proxy_metrics(_metrics())
    assert s.identity == "web.ns.serviceaccount.identity.trustmesh.cluster.local"
    assert s.cert_expiry == 1000.0 and s.bundle_digest == "abc"
    assert s.inbound.requests == 3 and s.inbound.successes == 2
    assert s.inbound.success_rate == pytest.approx(2 / 3)
    assert 5.0 <= (s.inbound.quantile(0.5) or 0) <= 10.0
    assert s.groups() == {"X25519MLKEM768": 5} and s.groups("outbound") == {"X25519MLKEM768": 2}
    assert s.refused == 1 and s.tcp_inbound == 1
    assert s.http[0] == "inbound"
    assert mesh_tls_groups([s, None, s]) == {"X25519MLKEM768": 4}


def test_rows_and_table() -> None:
    stats = {"ns/web-0": parse_proxy_metrics(_metrics()), "ns/gone-0": None}
    rows = workload_rows(stats, now=400.0)
    assert rows[0]["cert_expires_in_seconds"] == 600 and rows[0]["requests"] == 3
    assert rows[1] == {"workload": "ns/gone-0", "up": False}
    console = Console(width=200, record=True)
    console.print(render_table(rows, "t"))
    text = console.export_text()
    assert "X25519MLKEM768 (1 refused)" in text and "66.7%" in text and "10m00s" in text
    assert "proxy down" in text


@pytest.mark.parametrize(
    ("seconds", "text"), [(-1, "expired"), (12, "12s"), (245, "4m05s"), (86399, "23h59m")]
)
def test_expires_in(seconds: float, text: str) -> None:
    assert expires_in(seconds) == text
