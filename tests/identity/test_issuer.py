"""Which candidate issuers ``check_issuer`` accepts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from identity_testkit import make_env

from identity.errors import IssuerRejected
from identity.issuer import check_issuer
from pki.certs import Certificate, Credential, utcnow
from pki.keys import PrivateKey


def test_a_ca_whose_key_usage_forbids_signing_certificates_is_refused(tmp_path: Path) -> None:
    # BasicConstraints CA:TRUE but KeyUsage without keyCertSign: every leaf it signs fails
    # verification at every proxy, so accepting it would take the mesh down at the next
    # renewals while the service reports ready.
    now = utcnow()
    state = make_env(tmp_path / "store", now).store.load()
    anchor, bundle = state.anchor_credential(), state.require_bundle()

    def issuer(key_cert_sign: bool) -> Credential:
        key = PrivateKey.generate()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd issuer")]))
            .issuer_name(anchor.certificate.x509.subject)
            .public_key(key.key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, key_cert_sign, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    anchor.key.key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .sign(anchor.key.key, anchor.key.algorithm.signature_hash())  # type: ignore[arg-type]
        )
        return Credential(Certificate.from_x509(cert), key)

    check_issuer(issuer(True), bundle, source="test", at=now)  # the same, able to sign: fine
    with pytest.raises(
        IssuerRejected, match=r"cannot issue a certificate that verifies.*keyCertSign"
    ):
        check_issuer(issuer(False), bundle, source="test", at=now)
