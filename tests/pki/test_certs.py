"""Certificate builders: backdating, clamping, serials, SKI/AKI, EKUs, CA constraints, parsing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_testkit import T0, WEB, Chain, build_chain

from pki.bundle import TrustBundle
from pki.certs import (
    DEFAULT_CLOCK_SKEW,
    Certificate,
    Credential,
    create_anchor,
    create_issuer,
    issue_identity,
    issue_leaf,
    load_pem_chain,
    random_serial,
)
from pki.errors import (
    CertificateBuildError,
    CertificateParseError,
    KeyLoadError,
    UnsupportedAlgorithm,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from pki.verify import verify_chain


def _ext(cert: Certificate, cls: type) -> x509.ExtensionType:
    return cert.x509.extensions.get_extension_for_class(cls).value


def test_leaf_rules(chain: Chain) -> None:
    leaf = chain.leaf.certificate
    assert leaf.not_before == T0 - DEFAULT_CLOCK_SKEW
    assert leaf.not_after == T0 + timedelta(hours=24) + DEFAULT_CLOCK_SKEW
    assert leaf.dns_names == (WEB.dns_name,) and leaf.uris == ()
    assert leaf.common_name == WEB.dns_name
    assert not leaf.is_ca and leaf.path_length is None
    eku = _ext(leaf, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    ski = _ext(chain.issuer.certificate, x509.SubjectKeyIdentifier)
    assert _ext(leaf, x509.AuthorityKeyIdentifier).key_identifier == ski.digest
    assert _ext(leaf, x509.SubjectKeyIdentifier).digest
    assert leaf.key_algorithm is chain.leaf.key.algorithm


def test_ca_rules(chain: Chain) -> None:
    anchor, issuer = chain.anchor.certificate, chain.issuer.certificate
    assert anchor.is_ca and anchor.path_length == 1 and anchor.is_self_signed
    assert issuer.is_ca and issuer.path_length == 0 and not issuer.is_self_signed
    assert _ext(issuer, x509.KeyUsage).key_cert_sign
    aki = _ext(issuer, x509.AuthorityKeyIdentifier).key_identifier
    assert aki == _ext(anchor, x509.SubjectKeyIdentifier).digest
    assert chain.issuer.chain == ()  # the anchor is not part of the issuer's chain
    assert chain.leaf.chain == (issuer,)


def test_leaf_is_clamped_to_the_issuer_chain(ecdsa_chain: Chain) -> None:
    # 1 hour before the 2-day issuer expires, a 24h leaf is cut to the issuer's NotAfter
    late = ecdsa_chain.issuer.certificate.not_after - timedelta(hours=1)
    leaf = issue_leaf(
        PrivateKey.generate().public_key(), WEB.dns_name, ecdsa_chain.issuer, now=late
    )
    assert leaf.not_after == ecdsa_chain.issuer.certificate.not_after
    with pytest.raises(CertificateBuildError, match="expires"):
        issue_leaf(
            PrivateKey.generate().public_key(),
            WEB.dns_name,
            ecdsa_chain.issuer,
            now=ecdsa_chain.issuer.certificate.not_after,
        )


def test_leaf_is_clamped_to_the_anchor_it_is_given(ecdsa_chain: Chain) -> None:
    # The issuer's chain stops below the anchor, so the anchor is passed in to clamp to. Here
    # the anchor was re-issued on the same key with a shorter life: the 2-day issuer still
    # verifies against it and outlives it.
    anchor_key = ecdsa_chain.anchor.key
    anchor = create_anchor(anchor_key, now=T0, lifetime=timedelta(hours=6))
    verify_chain(ecdsa_chain.issuer.certificate, (), TrustBundle((anchor,)), at=T0)
    assert ecdsa_chain.issuer.certificate.not_after > anchor.not_after
    key = PrivateKey.generate().public_key()
    at = T0 + timedelta(hours=1)
    assert issue_leaf(key, WEB.dns_name, ecdsa_chain.issuer, now=at).not_after == at + timedelta(
        hours=24, seconds=20
    )
    leaf = issue_leaf(key, WEB.dns_name, ecdsa_chain.issuer, now=at, anchor=anchor)
    assert leaf.not_after == anchor.not_after
    with pytest.raises(CertificateBuildError, match="expires"):
        issue_leaf(key, WEB.dns_name, ecdsa_chain.issuer, now=anchor.not_after, anchor=anchor)


def test_issuer_is_clamped_to_the_anchor(ecdsa_chain: Chain) -> None:
    near_end = ecdsa_chain.anchor.certificate.not_after - timedelta(hours=3)
    issuer = create_issuer(PrivateKey.generate(), ecdsa_chain.anchor, now=near_end)
    assert issuer.certificate.not_after == ecdsa_chain.anchor.certificate.not_after


def test_serials_are_random_positive_128_bit() -> None:
    serials = {random_serial() for _ in range(2000)}
    assert len(serials) == 2000
    assert all(0 < s < 2**127 for s in serials)
    assert max(serials).bit_length() > 120


def test_spiffe_uri_and_long_identity(ecdsa_chain: Chain) -> None:
    cred = issue_identity(
        WEB, PrivateKey.generate(), ecdsa_chain.issuer, now=T0, with_spiffe_id=True
    )
    assert cred.certificate.uris == (WEB.spiffe_id,)
    assert cred.certificate.identities == (WEB.dns_name, WEB.spiffe_id)
    long_ident = Identity("a" * 60, "default")
    cert = issue_identity(long_ident, PrivateKey.generate(), ecdsa_chain.issuer, now=T0).certificate
    assert cert.dns_names == (long_ident.dns_name,)  # CN omitted (X.509 caps it at 64)


def test_mixed_algorithms() -> None:
    anchor_key = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    anchor = Credential(create_anchor(anchor_key, now=T0), anchor_key)
    issuer = create_issuer(PrivateKey.generate(KeyAlgorithm.ML_DSA_65), anchor, now=T0)
    leaf = issue_identity(WEB, PrivateKey.generate(KeyAlgorithm.ECDSA_P256), issuer, now=T0)
    assert issuer.certificate.key_algorithm is KeyAlgorithm.ML_DSA_65
    assert leaf.certificate.signature_algorithm != anchor.certificate.signature_algorithm


def test_builders_refuse_bad_input(ecdsa_chain: Chain) -> None:
    key = PrivateKey.generate()
    with pytest.raises(TypeError):
        create_anchor(key, now="2030-01-01")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        create_anchor(key, now=T0.replace(tzinfo=None))
    with pytest.raises(ValueError, match="positive"):
        create_anchor(key, now=T0, lifetime=timedelta(0))
    with pytest.raises(CertificateBuildError, match="path length 0"):
        create_issuer(key, ecdsa_chain.issuer, now=T0)
    with pytest.raises(CertificateBuildError, match="not a CA"):
        issue_leaf(key.public_key(), WEB.dns_name, ecdsa_chain.leaf, now=T0)
    with pytest.raises(UnsupportedAlgorithm):
        issue_leaf(object(), WEB.dns_name, ecdsa_chain.issuer, now=T0)


def test_credential_checks_key(ecdsa_chain: Chain) -> None:
    with pytest.raises(KeyLoadError, match="does not match"):
        Credential(ecdsa_chain.leaf.certificate, PrivateKey.generate())
    with pytest.raises(TypeError):
        Credential(ecdsa_chain.leaf.certificate.der, ecdsa_chain.leaf.key)  # type: ignore[arg-type]
    assert ecdsa_chain.leaf.expires == ecdsa_chain.leaf.certificate.not_after
    assert "PRIVATE" not in repr(ecdsa_chain.leaf)


def test_load_round_trips(chain: Chain) -> None:
    leaf = chain.leaf.certificate
    assert Certificate.load(leaf.pem) == leaf == Certificate.load(leaf.der)
    assert load_pem_chain(chain.leaf.chain_pem()) == chain.leaf.full_chain
    assert hash(Certificate.from_der(leaf.der)) == hash(leaf)
    with pytest.raises(CertificateParseError, match="expected one"):
        Certificate.from_pem(chain.leaf.chain_pem())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"hello", "no complete BEGIN/END CERTIFICATE block"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "no complete BEGIN/END CERTIFICATE block"),
        (
            b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n",
            "a certificate block is not valid base64 DER (Invalid padding)",
        ),
    ],
)
def test_pem_errors_say_what_is_wrong_without_a_link(data: bytes, problem: str) -> None:
    with pytest.raises(CertificateParseError) as e:
        load_pem_chain(data)
    assert str(e.value) == f"no valid PEM certificate found: {problem}"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_parse_errors(data: bytes) -> None:
    with pytest.raises(CertificateParseError):
        Certificate.load(data)
    with pytest.raises(CertificateParseError):
        load_pem_chain(b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n")


_DER = build_chain(KeyAlgorithm.ECDSA_P256).leaf.certificate.der


# a flipped sign bit gives a negative serial, which cryptography still loads with a warning
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_DER) - 1), st.integers(1, 255))
def test_mutated_certificates_load_fully_or_raise_parse_error(index: int, flip: int) -> None:
    data = bytearray(_DER)
    data[index] ^= flip
    try:
        cert = Certificate.load(bytes(data))
    except CertificateParseError:
        return
    # whatever loads has every property readable
    assert (cert.subject, cert.issuer, cert.dns_names, cert.is_ca, cert.path_length) is not None


def test_fast_leaf_builder_matches_the_fluent_builder(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue_leaf assembles its DER itself (pki/leafder.py); the result must be byte for byte
    the certificate the plain fluent builder makes."""
    import pki.certs as certs

    monkeypatch.setattr(certs, "random_serial", lambda: 0x1234)
    public_key = PrivateKey.generate(chain.leaf.key.algorithm).public_key()
    issuer = chain.issuer
    for spiffe in (None, WEB.spiffe_id):
        fast = issue_leaf(public_key, WEB.dns_name, issuer, now=T0, spiffe_id=spiffe)
        sans: list[x509.GeneralName] = [x509.DNSName(WEB.dns_name)]
        if spiffe:
            sans.append(x509.UniformResourceIdentifier(spiffe))
        reference = (
            x509.CertificateBuilder()
            .subject_name(x509.Name.from_rfc4514_string(f"CN={WEB.dns_name}"))
            .issuer_name(issuer.certificate.x509.subject)
            .public_key(public_key)
            .serial_number(0x1234)
            .not_valid_before(T0 - DEFAULT_CLOCK_SKEW)
            .not_valid_after(T0 + timedelta(hours=24) + DEFAULT_CLOCK_SKEW)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_ext(fast, x509.KeyUsage), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.certificate.x509.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .sign(issuer.key.key, issuer.key.algorithm.signature_hash())
        )
        assert fast.x509.tbs_certificate_bytes == reference.tbs_certificate_bytes


def test_lifetime_past_year_9999_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="9999"):
        create_anchor(PrivateKey.generate(), now=T0, lifetime=timedelta(days=999_999_999))
