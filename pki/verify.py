"""Chain verification at an explicit time. Every failure raises a typed
:class:`~pki.errors.VerificationError`; success returns the verified path.

The chains TrustMesh handles are short and linear (leaf → issuer [→ issuer] → anchor), so the
path is built by name and signature, and each constraint that matters for a mesh is checked with
its own error: validity window, signature, CA basic constraints, keyCertSign, path length, and
the leaf's identity. Both ECDSA and ML-DSA signatures are verified.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature

from pki.bundle import TrustBundle
from pki.certs import Certificate, Credential, issue_leaf
from pki.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    ConstraintViolation,
    IdentityMismatch,
    InvalidSignature,
    UntrustedChain,
)
from pki.keys import PrivateKey

MAX_DEPTH = 5


def check_validity(cert: Certificate, at: datetime) -> None:
    """Raise if ``cert`` is outside its validity window at ``at``."""
    if at.tzinfo is None:
        raise ValueError("verification time must be timezone-aware (UTC)")
    if at < cert.not_before:
        raise CertificateNotYetValid(
            f"{cert.subject} is not valid before {cert.not_before.isoformat()} "
            f"(checked at {at.isoformat()})"
        )
    if at > cert.not_after:
        raise CertificateExpired(
            f"{cert.subject} expired at {cert.not_after.isoformat()} (checked at {at.isoformat()})"
        )


def _signed_by(child: Certificate, parent: Certificate) -> bool:
    if child.x509.issuer != parent.x509.subject:
        return False
    try:
        child.x509.verify_directly_issued_by(parent.x509)
    except (_CryptoInvalidSignature, ValueError, TypeError):
        return False
    return True


def anchor_for(chain: Sequence[Certificate], bundle: TrustBundle) -> Certificate | None:
    """The anchor of ``bundle`` whose key signed the last certificate of ``chain`` (that
    certificate itself when it is an anchor), or None. Matched by signature, not by name:
    anchors made with the default name share their subject across rotations."""
    top = chain[-1]
    if top in bundle:
        return top
    return next((a for a in bundle.anchors if _signed_by(top, a)), None)


# The name on the probe leaf issued (and thrown away) when an issuer is checked.
PROBE_NAME = "issuer-check.trustmesh.invalid"


def check_can_issue(issuer: Credential, bundle: TrustBundle, *, at: datetime) -> None:
    """Raise unless a leaf that ``issuer`` signs verifies against ``bundle`` at ``at``: a CA
    whose key usage, path length or algorithm stops it from signing verifiable leaves is
    refused before it is installed, not after every renewal has failed."""
    probe = issue_leaf(PrivateKey.generate().public_key(), PROBE_NAME, issuer, now=at)
    verify_leaf(probe, issuer.full_chain, bundle, at=at, expected_identity=PROBE_NAME)


def _key_id(cert: Certificate, cls: type[x509.ExtensionType]) -> bytes | None:
    try:
        value = cert.x509.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    return getattr(value, "key_identifier", None) or getattr(value, "digest", None)


def _claims_parent(child: Certificate, parent: Certificate) -> bool:
    """True when ``child`` names ``parent`` as its issuer: same name and, when both carry key
    identifiers, the same key. A same-named CA with another key (say, the default anchor name of
    another installation) is then "untrusted", not "bad signature"."""
    if child.x509.issuer != parent.x509.subject:
        return False
    aki = _key_id(child, x509.AuthorityKeyIdentifier)
    ski = _key_id(parent, x509.SubjectKeyIdentifier)
    return aki is None or ski is None or aki == ski


def _check_ca(parent: Certificate, cas_below: int) -> None:
    try:
        bc = parent.x509.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ConstraintViolation(
            f"{parent.subject} has no basicConstraints and cannot sign"
        ) from None
    if not bc.ca:
        raise ConstraintViolation(f"{parent.subject} is not a CA (basicConstraints CA:FALSE)")
    if bc.path_length is not None and cas_below > bc.path_length:
        raise ConstraintViolation(
            f"{parent.subject} allows {bc.path_length} CA(s) below it, the chain has {cas_below}"
        )
    try:
        ku = parent.x509.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise ConstraintViolation(f"{parent.subject} lacks the keyCertSign key usage")


def verify_chain(
    cert: Certificate,
    intermediates: Sequence[Certificate],
    bundle: TrustBundle,
    *,
    at: datetime,
) -> tuple[Certificate, ...]:
    """Verify ``cert`` up to an anchor of ``bundle`` through ``intermediates`` at time ``at``.

    Returns the path ``(cert, intermediate…, anchor)``. ``cert`` may itself be a CA (to check an
    issuer against the anchors). Raises a :class:`VerificationError` subclass on failure.
    """
    check_validity(cert, at)
    if cert in bundle:
        return (cert,)
    path = [cert]
    pool = [c for c in intermediates if c != cert]
    current = cert
    for _ in range(MAX_DEPTH):
        cas_below = len(path) - 1
        anchor = next((a for a in bundle.anchors if _signed_by(current, a)), None)
        if anchor is not None:
            check_validity(anchor, at)
            _check_ca(anchor, cas_below)
            path.append(anchor)
            return tuple(path)
        parent = next((c for c in pool if _signed_by(current, c)), None)
        if parent is None:
            if any(_claims_parent(current, c) for c in (*pool, *bundle.anchors)):
                raise InvalidSignature(
                    f"the signature of {current.subject} does not verify with its issuer "
                    f"{current.issuer}"
                )
            raise UntrustedChain(
                f"{current.subject} is issued by {current.issuer}, which is neither in the "
                f"chain nor one of the {len(bundle.anchors)} trust anchor(s)"
            )
        check_validity(parent, at)
        _check_ca(parent, cas_below)
        path.append(parent)
        pool.remove(parent)
        current = parent
    raise UntrustedChain(f"no anchor reached within {MAX_DEPTH} certificates of {cert.subject}")


def verify_leaf(
    leaf: Certificate,
    intermediates: Sequence[Certificate],
    bundle: TrustBundle,
    *,
    at: datetime,
    expected_identity: str | None = None,
) -> tuple[Certificate, ...]:
    """Verify a workload certificate: an end-entity chain to the bundle carrying the identity."""
    if leaf.is_ca:
        raise ConstraintViolation(f"{leaf.subject} is a CA certificate, not a workload certificate")
    path = verify_chain(leaf, intermediates, bundle, at=at)
    if expected_identity is not None and expected_identity not in leaf.identities:
        names = ", ".join(leaf.identities) or "no DNS or URI SAN"
        raise IdentityMismatch(
            f"certificate identifies as {names}, but {expected_identity} was expected"
        )
    return path
