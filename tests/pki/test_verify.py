"""Chain verification at explicit times: each failure is its own typed error, ECDSA and ML-DSA."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from pki_testkit import T0, WEB, Chain, build_chain

from pki.bundle import TrustBundle
from pki.certs import (
    Certificate,
    Credential,
    _sign,
    create_issuer,
    issue_identity,
    issue_leaf,
    random_serial,
)
from pki.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    ConstraintViolation,
    IdentityMismatch,
    InvalidSignature,
    UntrustedChain,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.verify import anchor_for, verify_chain, verify_leaf


def test_valid_chain(chain: Chain) -> None:
    path = verify_leaf(
        chain.leaf.certificate,
        chain.leaf.chain,
        chain.bundle,
        at=T0,
        expected_identity=WEB.dns_name,
    )
    assert path == (chain.leaf.certificate, chain.issuer.certificate, chain.anchor.certificate)
    # an issuer verifies against the anchors too; an anchor is its own path
    assert len(verify_chain(chain.issuer.certificate, (), chain.bundle, at=T0)) == 2
    assert verify_chain(chain.anchor.certificate, (), chain.bundle, at=T0) == (
        chain.anchor.certificate,
    )


def test_expired_and_not_yet_valid(chain: Chain) -> None:
    leaf, rest = chain.leaf.certificate, chain.leaf.chain
    with pytest.raises(CertificateExpired):
        verify_leaf(leaf, rest, chain.bundle, at=leaf.not_after + timedelta(seconds=1))
    with pytest.raises(CertificateNotYetValid):
        verify_leaf(leaf, rest, chain.bundle, at=leaf.not_before - timedelta(seconds=1))
    # the boundaries themselves are inside the window
    verify_leaf(leaf, rest, chain.bundle, at=leaf.not_after)
    verify_leaf(leaf, rest, chain.bundle, at=leaf.not_before)
    with pytest.raises(ValueError, match="timezone"):
        verify_leaf(leaf, rest, chain.bundle, at=T0.replace(tzinfo=None))


def test_expired_issuer_in_a_valid_leaf_window(ecdsa_chain: Chain) -> None:
    # a leaf issued without clamping (built by hand) outlives its issuer
    issuer = ecdsa_chain.issuer
    late = issuer.certificate.not_after + timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.x509.subject)
        .public_key(PrivateKey.generate().public_key())
        .serial_number(random_serial())
        .not_valid_before(T0)
        .not_valid_after(late + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(WEB.dns_name)]), critical=False)
    )
    leaf = _sign(builder, issuer.key)
    with pytest.raises(CertificateExpired, match="identity issuer"):
        verify_leaf(leaf, (issuer.certificate,), ecdsa_chain.bundle, at=late)


def test_untrusted(chain: Chain) -> None:
    other = build_chain(chain.leaf.key.algorithm)
    with pytest.raises(UntrustedChain):
        verify_leaf(chain.leaf.certificate, chain.leaf.chain, other.bundle, at=T0)
    with pytest.raises(UntrustedChain):
        verify_leaf(chain.leaf.certificate, (), chain.bundle, at=T0)  # issuer missing


def test_bad_signature(chain: Chain) -> None:
    # an impostor issuer with the same name but another key signs the leaf: the leaf's AKI
    # names the impostor's key, so the chain is untrusted (not a broken signature)
    impostor_key = PrivateKey.generate(chain.leaf.key.algorithm)
    impostor = create_issuer(
        impostor_key, Credential(chain.anchor.certificate, chain.anchor.key), now=T0
    )
    forged = issue_leaf(impostor_key.public_key(), WEB.dns_name, impostor, now=T0)
    with pytest.raises(UntrustedChain):
        verify_leaf(forged, chain.leaf.chain, chain.bundle, at=T0)
    # flipping a byte of the leaf's signature
    der = bytearray(chain.leaf.certificate.der)
    der[-1] ^= 0x01
    with pytest.raises(InvalidSignature):
        verify_leaf(Certificate.from_der(bytes(der)), chain.leaf.chain, chain.bundle, at=T0)


def test_path_length(chain: Chain) -> None:
    # anchor (path length 1) -> issuer (0) -> sub-issuer is refused when building...
    # ... so forge one: an intermediate under the issuer with CA:TRUE, then a leaf below it
    issuer = chain.issuer
    sub_key = PrivateKey.generate(chain.leaf.key.algorithm)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=sub issuer"))
        .issuer_name(issuer.certificate.x509.subject)
        .public_key(sub_key.public_key())
        .serial_number(random_serial())
        .not_valid_before(T0 - timedelta(minutes=1))
        .not_valid_after(T0 + timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    sub = Credential(_sign(builder, issuer.key), sub_key, (issuer.certificate,))
    leaf = issue_leaf(PrivateKey.generate().public_key(), WEB.dns_name, sub, now=T0)
    with pytest.raises(ConstraintViolation, match="allows 0"):
        verify_leaf(leaf, sub.full_chain, chain.bundle, at=T0)


def test_ca_as_leaf_and_leaf_as_ca(chain: Chain) -> None:
    with pytest.raises(ConstraintViolation, match="is a CA"):
        verify_leaf(chain.issuer.certificate, (), chain.bundle, at=T0)
    # a leaf used as an issuer: its child does not verify (CA:FALSE)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(chain.leaf.certificate.x509.subject)
        .public_key(PrivateKey.generate().public_key())
        .serial_number(random_serial())
        .not_valid_before(T0 - timedelta(minutes=1))
        .not_valid_after(T0 + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.local")]), critical=False)
    )
    grandchild = _sign(builder, chain.leaf.key)
    with pytest.raises(ConstraintViolation, match="not a CA"):
        verify_leaf(grandchild, chain.leaf.full_chain, chain.bundle, at=T0)


def test_identity_mismatch(chain: Chain) -> None:
    with pytest.raises(IdentityMismatch, match=r"api\.default"):
        verify_leaf(
            chain.leaf.certificate,
            chain.leaf.chain,
            chain.bundle,
            at=T0,
            expected_identity=WEB.dns_name.replace("web", "api"),
        )


def test_spiffe_identity_and_multi_anchor_bundle(chain: Chain) -> None:
    other = build_chain(KeyAlgorithm.ECDSA_P256)
    both = TrustBundle((other.anchor.certificate, chain.anchor.certificate))
    cred = issue_identity(WEB, PrivateKey.generate(), chain.issuer, now=T0, with_spiffe_id=True)
    path = verify_leaf(cred.certificate, cred.chain, both, at=T0, expected_identity=WEB.spiffe_id)
    assert path[-1] == chain.anchor.certificate


def test_anchor_for_matches_by_signature_not_name(ecdsa_chain: Chain) -> None:
    # two anchors under the default name, as after a rotation; the issuer's is the second
    other = build_chain(KeyAlgorithm.ECDSA_P256, T0 + timedelta(days=1)).anchor.certificate
    mine = ecdsa_chain.anchor.certificate
    assert other.subject == mine.subject
    bundle = TrustBundle((other, mine))
    issuer = ecdsa_chain.issuer.certificate
    assert anchor_for((issuer,), bundle) == mine
    assert anchor_for(ecdsa_chain.leaf.full_chain, bundle) == mine
    assert anchor_for((mine,), bundle) == mine  # an anchor is its own
    assert anchor_for((issuer,), TrustBundle((other,))) is None
