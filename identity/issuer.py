"""The issuer the service signs with, and the checks a candidate issuer must pass before use.

An issuer is accepted only when its key matches its certificate, the certificate is a CA, it
verifies against the trust anchors at the time of loading (Linkerd's ``loadCredentials`` order),
and a certificate it issues verifies too (a CA whose key usage, path length or algorithm stops
it from signing verifiable leaves would otherwise be installed and break every renewal).
Both Secret formats are understood: Linkerd's ``crt.pem``/``key.pem`` and cert-manager's
``kubernetes.io/tls`` ``tls.crt``/``tls.key``/``ca.crt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from identity.errors import IssuerRejected, IssuerSourceError
from pki.bundle import TrustBundle
from pki.certs import Credential, load_pem_chain
from pki.errors import PKIError
from pki.keys import PrivateKey
from pki.verify import check_can_issue, verify_chain

# Linkerd's scheme linkerd.io/tls, and kubernetes.io/tls as cert-manager writes it.
LINKERD_CRT, LINKERD_KEY = "crt.pem", "key.pem"
TLS_CRT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"
ISSUER_FILES = (LINKERD_CRT, LINKERD_KEY, TLS_CRT, TLS_KEY, TLS_CA)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A validated issuer credential with the trust bundle it was checked against."""

    credential: Credential
    bundle: TrustBundle
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.credential, Credential):
            raise TypeError("credential must be a pki.certs.Credential")
        if not isinstance(self.bundle, TrustBundle):
            raise TypeError("bundle must be a pki.bundle.TrustBundle")

    @property
    def fingerprint(self) -> str:
        return self.credential.certificate.fingerprint

    @property
    def not_after(self) -> datetime:
        return self.credential.expires

    def same_as(self, other: Issuer | None) -> bool:
        """True when ``other`` signs with the same certificate under the same anchors."""
        return (
            other is not None
            and other.fingerprint == self.fingerprint
            and other.bundle.digest == self.bundle.digest
        )


def check_issuer(
    credential: Credential, bundle: TrustBundle, *, source: str, at: datetime
) -> Issuer:
    """Accept ``credential`` as an issuer at ``at`` or raise :class:`IssuerRejected`."""
    cert = credential.certificate
    if not cert.is_ca:
        raise IssuerRejected(
            f"issuer from {source} ({cert.subject}) is not a CA certificate; "
            "it must be an intermediate CA"
        )
    try:
        verify_chain(cert, credential.chain, bundle, at=at)
    except PKIError as e:
        raise IssuerRejected(
            f"issuer from {source} ({cert.subject}) does not verify against the "
            f"{len(bundle.anchors)} trust anchor(s): {e}"
        ) from None
    try:
        check_can_issue(credential, bundle, at=at)
    except (PKIError, ValueError) as e:
        raise IssuerRejected(
            f"issuer from {source} ({cert.subject}) cannot issue a certificate that verifies "
            f"against the trust anchors: {e}"
        ) from None
    return Issuer(credential, bundle, source)


def credential_from_pems(cert_pem: bytes, key_pem: bytes, *, source: str) -> Credential:
    """The issuer credential from a certificate chain PEM (issuer first) and its key."""
    try:
        chain = load_pem_chain(cert_pem)
        key = PrivateKey.load(key_pem)
        return Credential(chain[0], key, chain[1:])
    except PKIError as e:
        raise IssuerRejected(f"issuer from {source} cannot be loaded: {e}") from None


def credential_from_files(files: Mapping[str, bytes], *, source: str) -> Credential:
    """Read either Secret format from a name → bytes mapping (a directory or a Secret's data)."""
    if LINKERD_CRT in files or LINKERD_KEY in files:
        crt, key = files.get(LINKERD_CRT), files.get(LINKERD_KEY)
        names = (LINKERD_CRT, LINKERD_KEY)
    else:
        crt, key = files.get(TLS_CRT), files.get(TLS_KEY)
        names = (TLS_CRT, TLS_KEY)
    if not crt or not key:
        missing = [n for n, v in zip(names, (crt, key), strict=True) if not v]
        raise IssuerSourceError(
            f"issuer at {source} lacks {', '.join(missing)} "
            f"(expected {LINKERD_CRT}/{LINKERD_KEY} or {TLS_CRT}/{TLS_KEY})"
        )
    return credential_from_pems(crt, key, source=source)


def bundle_from_pem(pem: bytes, *, source: str) -> TrustBundle:
    try:
        return TrustBundle.from_pem(pem)
    except PKIError as e:
        raise IssuerSourceError(f"trust anchors from {source} cannot be loaded: {e}") from None
