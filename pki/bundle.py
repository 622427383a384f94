"""Trust bundles: the set of anchors a workload trusts, with a stable digest.

A bundle holds several anchors at once so that anchor rotation can overlap old and new. Its
digest is the SHA-256 over the sorted anchor fingerprints, so it does not depend on PEM order or
formatting; proxies report it, which makes the fleet's bundle state observable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from pki.certs import Certificate, load_pem_chain
from pki.errors import BundleError


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """An ordered, duplicate-free tuple of CA certificates trusted as anchors."""

    anchors: tuple[Certificate, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.anchors, tuple):
            raise TypeError("anchors must be a tuple of Certificate")
        if not self.anchors:
            raise BundleError("a trust bundle needs at least one anchor")
        seen: set[str] = set()
        for cert in self.anchors:
            if not isinstance(cert, Certificate):
                raise TypeError("anchors must be a tuple of Certificate")
            if not cert.is_ca:
                raise BundleError(f"{cert.subject} is not a CA certificate and cannot be an anchor")
            if cert.fingerprint in seen:
                raise BundleError(f"anchor {cert.fingerprint} appears twice in the bundle")
            seen.add(cert.fingerprint)

    @classmethod
    def of(cls, anchors: Iterable[Certificate]) -> TrustBundle:
        unique: dict[str, Certificate] = {}
        for cert in anchors:
            unique.setdefault(cert.fingerprint, cert)
        return cls(tuple(unique.values()))

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustBundle:
        return cls.of(load_pem_chain(pem))

    def pem(self) -> bytes:
        return b"".join(c.pem for c in self.anchors)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(c.fingerprint for c in self.anchors)

    @property
    def digest(self) -> str:
        """Stable SHA-256 (hex) over the sorted anchor fingerprints."""
        h = hashlib.sha256()
        for fp in sorted(self.fingerprints):
            h.update(bytes.fromhex(fp))
        return h.hexdigest()

    def find(self, fingerprint: str) -> Certificate:
        if not fingerprint:
            raise BundleError("the fingerprint is empty; give a unique prefix of an anchor's")
        matches = [c for c in self.anchors if c.fingerprint.startswith(fingerprint.lower())]
        if len(matches) != 1:
            what = "no anchor" if not matches else f"{len(matches)} anchors"
            raise BundleError(f"{what} in the bundle match fingerprint {fingerprint!r}")
        return matches[0]

    def add(self, cert: Certificate) -> TrustBundle:
        if cert.fingerprint in self.fingerprints:
            raise BundleError(f"anchor {cert.fingerprint} is already in the bundle")
        return TrustBundle((*self.anchors, cert))

    def remove(self, fingerprint: str) -> TrustBundle:
        target = self.find(fingerprint)
        rest = tuple(c for c in self.anchors if c.fingerprint != target.fingerprint)
        if not rest:
            raise BundleError("refusing to remove the last anchor: the bundle would be empty")
        return TrustBundle(rest)

    def earliest_expiry(self) -> datetime:
        return min(c.not_after for c in self.anchors)

    def __contains__(self, cert: object) -> bool:
        return isinstance(cert, Certificate) and cert.fingerprint in self.fingerprints
