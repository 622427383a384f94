"""Certificate renewal under a live connection: with 15 s workload certificates from a real
identity service, both proxies renew (at ~70 % of the life, Linkerd's schedule) while a TCP
connection through the mesh stays open; it keeps working, and new connections use the new
certificates."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
from mesh_testkit import (
    HOST,
    SHORT_LIVED_CERTS,
    MeshKit,
    ProxyPorts,
    echo_session,
    eventually,
    http_status,
    metric,
    roundtrip,
    short_lived_mesh,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

NS = "renew"
ECHO = f"echo.{NS}.svc.cluster.local:7000"


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MeshKit, dict[str, ProxyPorts]]]:
    yield from short_lived_mesh(tmp_path_factory.mktemp("renew"), NS)


def _refreshes(admin: str) -> float:
    return metric(admin, "identity_cert_refreshes_total", result="ok")


def test_renewal_during_a_long_lived_connection(
    mesh: tuple[MeshKit, dict[str, ProxyPorts]],
) -> None:
    _, proxies = mesh
    client, server = proxies["client-0"].admin_addr, proxies["echo-0"].admin_addr
    before = {a: (_refreshes(a), metric(a, "identity_cert_expiration_timestamp_seconds"))
              for a in (client, server)}  # fmt: skip
    with socket.create_connection((HOST, proxies["client-0"].upstreams[ECHO]), timeout=10) as s:
        assert roundtrip(s, b"before renewal") == b"before renewal"
        eventually(
            lambda: all(_refreshes(a) > before[a][0] for a in (client, server)),
            30,
            "both proxies renewing their certificates",
        )
        payload = os.urandom(50_000)
        assert roundtrip(s, payload) == payload  # the same connection, across the renewal
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    for admin in (client, server):
        assert metric(admin, "identity_cert_expiration_timestamp_seconds") > before[admin][1]
        assert metric(admin, "identity_cert_refreshes_total", result="error") == 0
    # A new mesh connection handshakes with the renewed certificates.
    handshakes = metric(client, "tls_handshakes_total", direction="outbound", result="ok")
    assert echo_session(proxies["client-0"].upstreams[ECHO], b"after") == b"after"
    assert metric(client, "tls_handshakes_total", direction="outbound", result="ok") > handshakes


def test_identity_away_current_certificate_used_while_renewal_retries(
    mesh: tuple[MeshKit, dict[str, ProxyPorts]],
) -> None:
    kit, proxies = mesh
    client = proxies["client-0"].admin_addr
    upstream = proxies["client-0"].upstreams[ECHO]
    expiry = metric(client, "identity_cert_expiration_timestamp_seconds")
    errors = metric(client, "identity_cert_refreshes_total", result="error")
    kit.stop("identity")
    eventually(
        lambda: metric(client, "identity_cert_refreshes_total", result="error") > errors,
        30,
        "renewal attempts failing while identity is down",
    )
    # The certificate in use is unchanged and, until it expires, new mesh connections work.
    assert metric(client, "identity_cert_expiration_timestamp_seconds") == expiry
    assert time.time() < expiry - 0.5, "the retry came too late to test the remaining validity"
    assert echo_session(upstream, b"identity is away") == b"identity is away"
    assert http_status(client, "/ready") == 200

    kit.start_identity(*SHORT_LIVED_CERTS)
    eventually(
        lambda: metric(client, "identity_cert_expiration_timestamp_seconds") > expiry,
        40,
        "renewal succeeding once identity is back",
    )
    assert echo_session(upstream, b"identity is back") == b"identity is back"
