"""DER leaf assembly: every piece checked against cryptography's own encoder or a decoder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from pki_testkit import T0, Chain, build_chain

import pki.certs as certs
from pki.certs import DEFAULT_CLOCK_SKEW, issue_leaf
from pki.keys import KeyAlgorithm, PrivateKey, spki_der
from pki.leafder import _oid_body, integer, key_identifier, time_value, tlv


def _reference_tbs(
    public_key: object, dns_name: str, chain: Chain, not_before: datetime, not_after: datetime
) -> bytes:
    """What CertificateBuilder writes for the same leaf (serial 0x1234)."""
    issuer = chain.issuer
    leaf = chain.leaf.certificate.x509
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(x509.NameOID.COMMON_NAME, dns_name)]
                if len(dns_name) <= 64
                else []
            )
        )
        .issuer_name(issuer.certificate.x509.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(0x1234)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in leaf.extensions:  # same kinds and order as every leaf
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([x509.DNSName(dns_name)])
        elif isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
        builder = builder.add_extension(value, critical=ext.critical)
    signed = builder.sign(issuer.key.key, issuer.key.algorithm.signature_hash())
    return signed.tbs_certificate_bytes


@pytest.mark.parametrize(
    ("dns_name", "now"),
    [
        ("a" * 64, T0),  # the longest name that still gets a CN
        ("b" * 63 + ".example", T0),  # too long for a CN: empty subject
        ("web.default.serviceaccount.identity.trustmesh.cluster.local", T0),
        ("late.example", datetime(2049, 12, 31, 12, tzinfo=UTC)),  # NotAfter in 2050
        ("later.example", datetime(2060, 6, 1, tzinfo=UTC)),  # both GeneralizedTime
    ],
)
def test_leaf_matches_certificatebuilder(
    chain: Chain, dns_name: str, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(certs, "random_serial", lambda: 0x1234)
    long_chain = chain
    if now > T0 + timedelta(days=1):
        long_chain = build_chain(chain.leaf.key.algorithm, now)
    public_key = PrivateKey.generate(chain.leaf.key.algorithm).public_key()
    leaf = issue_leaf(public_key, dns_name, long_chain.issuer, now=now)
    reference = _reference_tbs(public_key, dns_name, long_chain, leaf.not_before, leaf.not_after)
    assert leaf.x509.tbs_certificate_bytes == reference
    assert leaf.not_before == now - DEFAULT_CLOCK_SKEW


def test_signature_verifies_with_the_issuer_key(chain: Chain) -> None:
    leaf = issue_leaf(chain.leaf.key.public_key(), "web.example", chain.issuer, now=T0)
    leaf.x509.verify_directly_issued_by(chain.issuer.certificate.x509)
    assert (
        leaf.x509.signature_algorithm_oid == chain.issuer.certificate.x509.signature_algorithm_oid
    )


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_key_identifier_is_rfc5280_method_1(algorithm: KeyAlgorithm) -> None:
    public_key = PrivateKey.generate(algorithm).public_key()
    expected = x509.SubjectKeyIdentifier.from_public_key(public_key).digest  # type: ignore[arg-type]
    assert key_identifier(spki_der(public_key)) == expected


def test_key_identifier_refuses_spki_without_a_bit_string() -> None:
    with pytest.raises(ValueError, match="BIT STRING"):
        key_identifier(tlv(0x30, tlv(0x30, b"\x06\x01\x00") + tlv(0x04, b"\x00\x01")))


@given(st.integers(min_value=0, max_value=2**200))
def test_integer_is_minimal_twos_complement(n: int) -> None:
    der = integer(n)
    assert der[0] == 0x02
    header = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    body = der[header:]
    assert int.from_bytes(body, "big", signed=True) == n
    # X.690 §8.3.2: no leading octet that only repeats the sign of the next one
    assert len(body) == 1 or not (body[0] == 0 and body[1] < 0x80)


def test_negative_integers_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        integer(-1)


@pytest.mark.parametrize(
    ("dotted", "hex_body"),
    [
        ("1.2.840.10045.4.3.2", "2a8648ce3d040302"),  # ecdsa-with-SHA256
        ("2.16.840.1.101.3.4.3.18", "608648016503040312"),  # id-ml-dsa-65
        ("2.5.29.17", "551d11"),
        ("2.999.3", "883703"),  # X.690's example: first arcs above 127 combined
    ],
)
def test_oid_bodies(dotted: str, hex_body: str) -> None:
    assert _oid_body(dotted).hex() == hex_body


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 65535, 65536])
def test_lengths_are_definite_and_minimal(size: int) -> None:
    der = tlv(0x04, b"\0" * size)
    if size < 128:
        assert der[1] == size
    else:
        count = der[1] & 0x7F
        assert int.from_bytes(der[2 : 2 + count], "big") == size
        assert der[2] != 0  # no leading zero octets in the length


def test_times_switch_to_generalized_in_2050() -> None:
    assert time_value(datetime(2049, 12, 31, 23, 59, 59, 999, tzinfo=UTC)) == (
        b"\x17\x0d491231235959Z"
    )
    assert time_value(datetime(2050, 1, 1, tzinfo=UTC)) == b"\x18\x0f20500101000000Z"


def test_non_ascii_names_are_refused(chain: Chain) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValueError, match="ASCII"):
        issue_leaf(key, "wéb.example", chain.issuer, now=T0)
    with pytest.raises(ValueError, match="ASCII"):
        issue_leaf(key, "web.example", chain.issuer, now=T0, spiffe_id="spiffe://ü/x")


def test_wrong_name_types_and_empty_names_are_refused(chain: Chain) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TypeError, match="str"):
        issue_leaf(key, b"web.example", chain.issuer, now=T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        issue_leaf(key, "", chain.issuer, now=T0)
