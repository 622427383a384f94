"""Which candidate issuers ``check_issuer`` accepts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from identity_testkit import make_env
from pki_testkit import hand_built_issuer

from identity.errors import IssuerRejected
from identity.issuer import check_issuer
from pki.certs import Credential, utcnow


def test_a_ca_whose_key_usage_forbids_signing_certificates_is_refused(tmp_path: Path) -> None:
    # BasicConstraints CA:TRUE but KeyUsage without keyCertSign: every leaf it signs fails
    # verification at every proxy, so accepting it would take the mesh down at the next
    # renewals while the service reports ready.
    now = utcnow()
    state = make_env(tmp_path / "store", now).store.load()
    anchor, bundle = state.anchor_credential(), state.require_bundle()

    def issuer(key_cert_sign: bool) -> Credential:
        return hand_built_issuer(
            anchor,
            not_before=now - timedelta(minutes=1),
            not_after=now + timedelta(days=2),
            key_cert_sign=key_cert_sign,
        )

    check_issuer(issuer(True), bundle, source="test", at=now)  # the same, able to sign: fine
    with pytest.raises(
        IssuerRejected, match=r"cannot issue a certificate that verifies.*keyCertSign"
    ):
        check_issuer(issuer(False), bundle, source="test", at=now)
