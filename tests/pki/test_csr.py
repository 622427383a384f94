"""CSR validation: every refusal raises its own named CSRError; parsers never crash."""

from __future__ import annotations

import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.csr import create_csr, parse_csr, validate_csr
from pki.errors import (
    CSRError,
    CSRIdentityMismatch,
    CSRKeyNotAllowed,
    CSRMalformed,
    CSRSignatureInvalid,
    CSRSubjectAltNameError,
    CSRTooLarge,
)
from pki.keys import KeyAlgorithm, PrivateKey

WEB = "web.default.serviceaccount.identity.trustmesh.cluster.local"
API = "api.default.serviceaccount.identity.trustmesh.cluster.local"
ECDSA = PrivateKey.generate()


def raw_csr(
    key: object,
    sans: list[x509.GeneralName] | None,
    *,
    cn: str | None = WEB,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_valid_csr(algorithm: KeyAlgorithm) -> None:
    key = PrivateKey.generate(algorithm)
    der = create_csr(WEB, key)
    v = validate_csr(der, expected_name=WEB, allowed_algorithms=tuple(KeyAlgorithm))
    assert v.dns_name == WEB and v.algorithm is algorithm
    assert key.matches(v.public_key)
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert validate_csr(pem, allowed_algorithms=tuple(KeyAlgorithm)).dns_name == WEB


def test_mldsa_is_refused_unless_allowed() -> None:
    der = create_csr(WEB, PrivateKey.generate(KeyAlgorithm.ML_DSA_65))
    with pytest.raises(CSRKeyNotAllowed, match="ml-dsa-65 is not allowed"):
        validate_csr(der)


def test_p384_key_refused() -> None:
    der = raw_csr(
        ec.generate_private_key(ec.SECP384R1()), [x509.DNSName(WEB)], algorithm=hashes.SHA256()
    )
    with pytest.raises(CSRKeyNotAllowed, match="P-256"):
        validate_csr(der)


def test_ed25519_key_refused() -> None:
    der = raw_csr(ed25519.Ed25519PrivateKey.generate(), [x509.DNSName(WEB)])
    with pytest.raises(CSRKeyNotAllowed):
        validate_csr(der)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_bad_signature(algorithm: KeyAlgorithm) -> None:
    der = bytearray(create_csr(WEB, PrivateKey.generate(algorithm)))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    with pytest.raises(CSRSignatureInvalid):
        validate_csr(bytes(der), allowed_algorithms=tuple(KeyAlgorithm))


def test_signature_by_another_key() -> None:
    # a well-formed CSR whose public key was swapped: the signature cannot verify
    other = PrivateKey.generate()
    good = x509.load_der_x509_csr(create_csr(WEB, ECDSA))
    own = ECDSA.public_key_der()
    swapped = good.public_bytes(serialization.Encoding.DER).replace(own, other.public_key_der())
    with pytest.raises(CSRSignatureInvalid):
        validate_csr(swapped)


@pytest.mark.parametrize("digest", [hashes.SHA384(), hashes.SHA512()])
def test_ecdsa_with_longer_hashes_accepted(digest: hashes.HashAlgorithm) -> None:
    der = raw_csr(ECDSA.key, [x509.DNSName(WEB)], algorithm=digest)
    assert validate_csr(der, expected_name=WEB).dns_name == WEB


def test_ecdsa_with_sha224_refused_by_name() -> None:
    der = raw_csr(ECDSA.key, [x509.DNSName(WEB)], algorithm=hashes.SHA224())
    with pytest.raises(CSRSignatureInvalid, match=r"1\.2\.840\.10045\.4\.3\.1.*SHA-256"):
        validate_csr(der)


def test_ecdsa_signature_swapped_for_another_hash_refused() -> None:
    # signed with SHA-384 but labelled SHA-256: the declared hash is the one checked
    der = raw_csr(ECDSA.key, [x509.DNSName(WEB)], algorithm=hashes.SHA384())
    sha384 = bytes.fromhex("06082a8648ce3d040303")
    sha256 = bytes.fromhex("06082a8648ce3d040302")
    relabelled = der.replace(sha384, sha256)
    assert relabelled != der
    with pytest.raises(CSRSignatureInvalid, match="does not verify"):
        validate_csr(relabelled)


def test_no_san() -> None:
    with pytest.raises(CSRSubjectAltNameError, match="no subjectAltName"):
        validate_csr(raw_csr(ECDSA.key, None, algorithm=hashes.SHA256()))


def test_several_dns_sans() -> None:
    der = raw_csr(ECDSA.key, [x509.DNSName(WEB), x509.DNSName(API)], algorithm=hashes.SHA256())
    with pytest.raises(CSRSubjectAltNameError, match="2 DNS SANs"):
        validate_csr(der)


def test_empty_san_list() -> None:
    with pytest.raises(CSRSubjectAltNameError):
        validate_csr(raw_csr(ECDSA.key, [], algorithm=hashes.SHA256()))


def test_uri_san_refused() -> None:
    der = create_csr(WEB, ECDSA, spiffe_id="spiffe://cluster.local/ns/default/sa/web")
    with pytest.raises(CSRSubjectAltNameError, match="UniformResourceIdentifier"):
        validate_csr(der)


def test_wrong_identity() -> None:
    with pytest.raises(CSRIdentityMismatch, match="requested identity"):
        validate_csr(create_csr(API, ECDSA), expected_name=WEB)


def test_cn_differs_from_san() -> None:
    der = raw_csr(ECDSA.key, [x509.DNSName(WEB)], cn=API, algorithm=hashes.SHA256())
    with pytest.raises(CSRIdentityMismatch, match="CN"):
        validate_csr(der)
    # no CN at all is fine: the SAN is the identity
    assert validate_csr(raw_csr(ECDSA.key, [x509.DNSName(WEB)], cn=None, algorithm=hashes.SHA256()))


def test_refusals_quote_at_most_80_characters_of_a_name() -> None:
    # A 12,000-character SAN fits in a CSR under the 16 KiB limit; quoted whole, the reason
    # would pass gRPC's metadata limit and reach the caller as RESOURCE_EXHAUSTED instead.
    long_name = "a" * 12_000 + ".example"
    der = raw_csr(ECDSA.key, [x509.DNSName(long_name)], cn=None, algorithm=hashes.SHA256())
    with pytest.raises(CSRIdentityMismatch) as e:
        validate_csr(parse_csr(der), expected_name=WEB)
    message = str(e.value)
    assert len(message) < 300 and "... (12008 characters)" in message and WEB in message


def test_one_mib_of_garbage() -> None:
    with pytest.raises(CSRTooLarge, match="over the limit"):
        validate_csr(os.urandom(1024 * 1024))


def test_small_garbage_and_empty() -> None:
    with pytest.raises(CSRMalformed):
        validate_csr(os.urandom(300))
    with pytest.raises(CSRMalformed, match="empty"):
        parse_csr(b"")
    with pytest.raises(CSRMalformed):
        parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(TypeError):
        parse_csr("csr")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_only_raise_csr_errors(data: bytes) -> None:
    with pytest.raises(CSRError):
        validate_csr(data)


_VALID = create_csr(WEB, ECDSA)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255))
def test_mutated_csrs_only_raise_csr_errors(index: int, flip: int) -> None:
    data = bytearray(_VALID)
    data[index] ^= flip
    try:
        validate_csr(bytes(data), expected_name=WEB)
    except CSRError:
        pass
