"""The sidecar's control-plane families (identity client, trust bundle, destination client),
rendered by the proxy without prometheus_client: values, names and Prometheus text."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from identity_testkit import identity, make_env
from prometheus_client.parser import text_string_to_metric_families

from destination.client import ClientMetrics
from identity.server import IdentityServer, ServerConfig
from identity.sources import StoreSource
from pki.certs import utcnow
from proxy.control import ControlMetrics, IdentityCredentials, TrustAnchors

PROMTOOL = shutil.which("promtool")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_control_families_follow_the_clients(tmp_path: Path) -> None:
    env = make_env(tmp_path / "store", utcnow())
    bundle = env.store.load().require_bundle()
    (tmp_path / "anchors.pem").write_bytes(bundle.pem())
    server = IdentityServer(
        ServerConfig(), StoreSource(env.store), env.validator(utcnow), clock=utcnow
    )
    await server.start()
    try:
        client = env.client(f"127.0.0.1:{server.port}", bundle=bundle)
        anchors = TrustAnchors(tmp_path / "anchors.pem", clock=lambda: 0.0, watch_file=False)
        destination = ClientMetrics()
        metrics = ControlMetrics(IdentityCredentials(client, anchors), destination)
        # What a TLS channel reports (tests/proxy/test_rpc.py checks the reports themselves).
        handshakes = metrics.control_plane_handshakes
        handshakes.inc(("trustmesh-identity.example", "X25519MLKEM768", "ok"))
        handshakes.inc(("trustmesh-identity.example", "x25519", "kex_refused"))
        before = samples(metrics.render())
        assert before[("identity_cert_expiration_timestamp_seconds", ())] == 0
        info = ("trustmesh_proxy_identity_info", (("identity", identity()), ("ready", "0")))
        assert before[info] == 1

        await client.step()
        await client.step()
        destination.reconnects["inbound"] += 3
        destination.updates["destination"] += 2
        destination.channel_rebuilds += 1
        destination.up, destination.stale = 0, 2
        text = metrics.render()
    finally:
        await server.stop(0)
    after = samples(text)
    credential = client.current()
    assert credential is not None and client.expiration is not None
    assert after[("identity_cert_expiration_timestamp_seconds", ())] == (
        client.expiration.timestamp()
    )
    assert after[("identity_cert_refreshes_total", (("result", "ok"),))] == 2
    assert after[("identity_cert_refreshes_total", (("result", "error"),))] == 0
    workload = (
        ("fingerprint", credential.certificate.fingerprint),
        ("role", "workload"),
        ("source", "proxy"),
        ("subject", credential.certificate.subject),
    )
    assert after[("trustmesh_cert_not_after_timestamp_seconds", workload)] == (
        credential.certificate.not_after.timestamp()
    )
    bundle_info = (("digest", bundle.digest), ("source", "file"))
    assert after[("trustmesh_proxy_trust_bundle_info", bundle_info)] == 1
    assert after[(info[0], (("identity", identity()), ("ready", "1")))] == 1
    assert after[("trustmesh_destination_client_control_plane_up", ())] == 0
    assert after[("trustmesh_destination_client_stale_streams", ())] == 2
    reconnects = ("trustmesh_destination_client_reconnects_total", (("stream", "inbound"),))
    assert after[reconnects] == 3
    updates = ("trustmesh_destination_client_updates_total", (("stream", "destination"),))
    assert after[updates] == 2
    assert after[("trustmesh_destination_client_channel_rebuilds_total", ())] == 1
    control = "trustmesh_proxy_control_plane_tls_handshakes_total"
    refused = (
        ("group", "x25519"),
        ("result", "kex_refused"),
        ("server", "trustmesh-identity.example"),
    )
    assert after[(control, refused)] == 1
    if PROMTOOL is None:
        pytest.skip("promtool (Debian package prometheus) is missing")
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
