"""Shared fixtures: a real PKI (anchor -> issuer -> workload leaves) from pki, as PEM bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from pki.bundle import TrustBundle
from pki.certs import Credential, create_anchor, create_issuer, issue_identity
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from proxy.meshtls import MeshCredentials

NOW = datetime(2026, 1, 1, tzinfo=UTC)  # a fixed time: not needed by OpenSSL, used for issuance


@dataclass
class TestPKI:
    anchor: Credential
    issuer: Credential
    bundle: TrustBundle

    def credentials(self, sa: str, ns: str = "default", *, spiffe: bool = False) -> MeshCredentials:
        ident = Identity(sa, ns)
        key = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
        now = datetime.now(UTC)  # OpenSSL verifies against the wall clock
        cred = issue_identity(ident, key, self.issuer, now=now, with_spiffe_id=spiffe)
        return MeshCredentials(ident.dns_name, cred.chain_pem(), key.to_pem(), self.bundle.pem())


def make_pki() -> TestPKI:
    now = datetime.now(UTC)
    akey = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
    anchor = create_anchor(akey, now=now, lifetime=timedelta(days=30))
    anchor_cred = Credential(anchor, akey)
    issuer = create_issuer(
        PrivateKey.generate(KeyAlgorithm.ECDSA_P256),
        anchor_cred,
        now=now,
        lifetime=timedelta(days=7),
    )
    return TestPKI(anchor_cred, issuer, TrustBundle.of([anchor]))


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    return make_pki()


@pytest.fixture(scope="session")
def other_pki() -> TestPKI:
    return make_pki()
