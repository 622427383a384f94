"""What the alerts know about the certificates: roles, renewal points and one scan's snapshot.

A source (``alerts.sources``) yields certificates; this module turns them into
:class:`~alerts.thresholds.CertTimes` (role, subject, fingerprint, source and the three
timestamps) and gathers one pass over all sources into an immutable :class:`Inventory`, which
the exporter renders at scrape time and ``trustmesh alerts check`` evaluates directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from alerts.thresholds import ROLES, CertTimes
from pki.certs import Certificate
from pki.renewal import PROXY_REFRESH_FRACTION, RenewalPolicy, renewal_point

# Renewal points the exporter publishes: workloads are refreshed by their proxy at 70% of their
# life (Linkerd's schedule); anchors, issuers and everything else by the rotation cron job's
# default (two thirds of the life).
WORKLOAD_POLICY = RenewalPolicy(fraction=PROXY_REFRESH_FRACTION)
DEFAULT_POLICY = RenewalPolicy()

_IDENTITY_MARKER = ".serviceaccount.identity."


def classify(cert: Certificate) -> str:
    """The role of a certificate found somewhere, judged from the certificate alone.

    A self-signed CA is a trust anchor, any other CA an issuer; a leaf carrying a mesh identity
    (Linkerd-style name or SPIFFE URI) is a workload certificate, one for a Kubernetes Service
    name (``*.svc``) a webhook's; anything else is ``other``.
    """
    if cert.is_ca:
        return "trust_anchor" if cert.is_self_signed else "issuer"
    if any(_IDENTITY_MARKER in name for name in cert.dns_names) or any(
        uri.startswith("spiffe://") for uri in cert.uris
    ):
        return "workload"
    if any(name.endswith((".svc", ".svc.cluster.local")) for name in cert.dns_names):
        return "webhook"
    return "other"


def cert_times(cert: Certificate, role: str, source: str) -> CertTimes:
    """The alerting view of ``cert`` as seen by ``source`` in ``role``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    policy = WORKLOAD_POLICY if role == "workload" else DEFAULT_POLICY
    due = renewal_point(cert.not_before, cert.not_after, policy)
    return CertTimes(
        role=role,
        subject=cert.subject,
        fingerprint=cert.fingerprint,
        source=source,
        not_before=cert.not_before.timestamp(),
        not_after=cert.not_after.timestamp(),
        renewal_due=due.timestamp(),
    )


@dataclass(frozen=True, slots=True)
class Reading:
    """What one source held at one scan: certificates with their roles, and the trust bundle
    digest if the source has a bundle."""

    certificates: tuple[tuple[Certificate, str], ...] = ()
    bundle_digest: str | None = None
    # Parts of the source that could not be read (one bad file in a directory): the source
    # counts as failed, but the certificates it did yield are still watched.
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """Outcome of reading one source: ``error`` is empty when it was read."""

    source: str
    error: str = ""
    certificates: int = 0

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True, slots=True)
class Inventory:
    """One pass over every source at ``taken_at`` (epoch seconds)."""

    taken_at: float
    certs: tuple[CertTimes, ...] = ()
    bundles: tuple[tuple[str, str], ...] = ()  # (digest, source)
    sources: tuple[SourceStatus, ...] = ()

    @property
    def errors(self) -> tuple[SourceStatus, ...]:
        return tuple(s for s in self.sources if not s.ok)


def build_inventory(
    taken_at: float, results: Iterable[tuple[str, Reading | Exception]]
) -> Inventory:
    """Gather ``(source, reading or the error reading it raised)`` pairs into an Inventory.

    A certificate held twice by one source (an anchor that is also in a chain file) is kept
    once: Prometheus rejects a scrape with two samples of the same series.
    """
    certs: dict[tuple[str, str, str], CertTimes] = {}
    bundles: list[tuple[str, str]] = []
    statuses: list[SourceStatus] = []
    for source, result in results:
        if isinstance(result, Exception):
            statuses.append(SourceStatus(source, error=str(result) or type(result).__name__))
            continue
        for cert, role in result.certificates:
            times = cert_times(cert, role, source)
            certs.setdefault((role, times.fingerprint, source), times)
        if result.bundle_digest is not None:
            bundles.append((result.bundle_digest, source))
        statuses.append(
            SourceStatus(
                source, error="; ".join(result.errors), certificates=len(result.certificates)
            )
        )
    return Inventory(taken_at, tuple(certs.values()), tuple(bundles), tuple(statuses))
