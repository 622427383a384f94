"""Inspection of certificates, chains, stores and live TLS endpoints (real handshakes)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pki_testkit import T0, WEB, Chain, TLSServer

from pki.errors import CertificateParseError, EndpointError, StoreNotInitialized
from pki.inspect import (
    Endpoint,
    describe_certificate,
    describe_chain,
    describe_store,
    load_certificates,
    parse_endpoint,
    probe_endpoint,
)
from pki.keys import KeyAlgorithm
from pki.renewal import RenewalPolicy
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore


def test_describe_leaf(chain: Chain) -> None:
    info = describe_certificate(chain.leaf.certificate, T0)
    assert info.dns_names == (WEB.dns_name,)
    assert info.status == "valid"
    assert not info.is_ca and not info.self_signed
    assert info.key_algorithm == chain.leaf.key.algorithm.value
    assert timedelta(hours=23) < info.remaining <= timedelta(hours=24, seconds=20)
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["fingerprint_sha256"] == chain.leaf.certificate.fingerprint


def test_status_follows_the_given_time(ecdsa_chain: Chain) -> None:
    leaf = ecdsa_chain.leaf.certificate
    assert describe_certificate(leaf, T0 - timedelta(hours=1)).status == "not-yet-valid"
    expired = describe_certificate(leaf, T0 + timedelta(days=2))
    assert expired.status == "expired"
    assert expired.remaining < timedelta(0)


def test_describe_chain_verifies_against_a_bundle(chain: Chain) -> None:
    certs = chain.leaf.full_chain
    ok = describe_chain(certs, T0, bundle=chain.bundle)
    assert ok.verified is True and ok.verify_error is None
    assert ok.expires == min(c.not_after for c in certs)
    assert describe_chain(certs, T0).verified is None
    late = describe_chain(certs, T0 + timedelta(days=3), bundle=chain.bundle)
    assert late.verified is False
    assert late.verify_error is not None and late.verify_error.startswith("CertificateExpired")


def test_load_certificates_pem_and_der(ecdsa_chain: Chain) -> None:
    pem = ecdsa_chain.leaf.chain_pem()
    assert load_certificates(pem) == ecdsa_chain.leaf.full_chain
    assert load_certificates(ecdsa_chain.leaf.certificate.der) == (ecdsa_chain.leaf.certificate,)
    with pytest.raises(CertificateParseError):
        load_certificates(b"not a certificate")
    with pytest.raises(CertificateParseError):
        describe_chain((), T0)


def test_describe_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(StoreNotInitialized):
        describe_store(store, T0)
    init_anchor(store, now=T0)
    issue_issuer(store, now=T0, lifetime=timedelta(hours=48))
    info = describe_store(store, T0 + timedelta(hours=1))
    assert info.version == 2 and info.versions == 2
    assert info.anchor_key_present
    assert len(info.anchors) == 1 and info.signing_anchor == info.anchors[0].fingerprint
    assert info.bundle_digest == store.trust_bundle().digest
    assert info.issuer is not None and info.issuer.verified is True
    assert info.renewal_action == "wait"
    # default policy: renew with one third of the life left
    assert info.renew_at is not None
    assert abs(info.renew_at - (T0 + timedelta(hours=32))) < timedelta(seconds=30)
    due = describe_store(
        store, T0 + timedelta(hours=40), policy=RenewalPolicy(renew_before=timedelta(hours=12))
    )
    assert due.renewal_action == "renew"
    assert json.loads(json.dumps(due.to_dict()))["renewal"]["action"] == "renew"
    assert due.next_issuer_lifetime == timedelta(hours=48)
    assert due.to_dict()["next_issuer_lifetime_seconds"] == 48 * 3600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4143", Endpoint("127.0.0.1", 4143)),
        ("localhost:443", Endpoint("localhost", 443)),
        ("[::1]:8443", Endpoint("::1", 8443)),
        ("example.com", None),
        ("host:0", None),
        ("host:70000", None),
        ("/etc/x:1", None),
        ("", None),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint | None) -> None:
    assert parse_endpoint(text) == expected


def test_endpoint_str() -> None:
    assert str(Endpoint("::1", 1)) == "[::1]:1"
    with pytest.raises(ValueError):
        Endpoint("h", 0)


def test_probe_mldsa_endpoint_negotiates_hybrid_kem(
    mldsa_chain: Chain, tls_server: Callable[..., TLSServer]
) -> None:
    server = tls_server(mldsa_chain.leaf)
    info = probe_endpoint(
        Endpoint("127.0.0.1", server.port), now=T0, timeout=10, bundle=mldsa_chain.bundle
    )
    assert info.protocol == "TLSv1.3"
    assert info.group == "X25519MLKEM768"
    assert info.cipher.startswith("TLS_")
    assert [c.fingerprint for c in info.chain.certificates] == [
        c.fingerprint for c in mldsa_chain.leaf.full_chain
    ]
    assert info.chain.certificates[0].key_algorithm == KeyAlgorithm.ML_DSA_65.value
    assert info.chain.verified is True
    assert info.server_name is None  # no SNI for an IP address
    assert json.loads(json.dumps(info.to_dict()))["group"] == "X25519MLKEM768"


def test_probe_presents_client_certificate(
    ecdsa_chain: Chain, live_mldsa_chain: Chain, tls_server: Callable[..., TLSServer]
) -> None:
    # The server (OpenSSL) verifies the client chain at the real clock, hence a live chain.
    mldsa_chain = live_mldsa_chain
    server = tls_server(ecdsa_chain.leaf, client_ca=mldsa_chain.bundle)
    client = mldsa_chain.leaf
    info = probe_endpoint(
        Endpoint("127.0.0.1", server.port), now=T0, client=client, server_name="web.local"
    )
    assert info.client_certificate == mldsa_chain.leaf.certificate.subject
    assert info.server_name == "web.local"
    assert info.chain.verified is None
    server.wait_for(1)
    assert server.errors == []
    assert server.client_certs == [
        [mldsa_chain.leaf.certificate.subject, mldsa_chain.issuer.certificate.subject]
    ]


def test_probe_errors_are_endpoint_errors() -> None:
    # a port with nothing listening
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(EndpointError, match="cannot connect"):
        probe_endpoint(Endpoint("127.0.0.1", port), now=T0, timeout=2)
    # a listener that never speaks TLS: bounded by the timeout
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(EndpointError, match="timed out"):
            probe_endpoint(Endpoint("127.0.0.1", silent.getsockname()[1]), now=T0, timeout=0.5)
    finally:
        silent.close()


def test_probe_plain_http_server_fails_cleanly() -> None:
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(EndpointError):
            probe_endpoint(Endpoint("127.0.0.1", listener.getsockname()[1]), now=T0, timeout=5)
    finally:
        t.join(timeout=5)
        listener.close()
