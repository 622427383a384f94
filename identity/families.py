"""Certificate and trust-bundle metric families as plain values.

The identity service exports them through prometheus_client (:mod:`identity.metrics`); the
proxy renders Prometheus text itself and never loads prometheus_client. Both take the family's
name, labels and values from here, so a proxy's ``trustmesh_cert_*`` series match the service's
and the alerts exporter's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pki.certs import Certificate
from pki.renewal import PROXY_REFRESH_FRACTION, RenewalPolicy, renewal_point

CERT_LABELS = ("role", "subject", "fingerprint", "source")
# Workload certificates are renewed by their proxy at 70% of their life (Linkerd's schedule);
# CAs by the rotation job's default, two thirds of their life (as alerts.inventory publishes).
_RENEWAL = {"workload": RenewalPolicy(fraction=PROXY_REFRESH_FRACTION)}
_CA_RENEWAL = RenewalPolicy()


@dataclass(frozen=True, slots=True)
class GaugeFamily:
    """A gauge family: its name, help, label names and (label values, value) samples."""

    name: str
    help: str
    labels: tuple[str, ...]
    samples: tuple[tuple[tuple[str, ...], float], ...]


def certificate_families(
    certificates: Iterable[tuple[str, Certificate]], source: str
) -> tuple[GaugeFamily, ...]:
    """``trustmesh_cert_*_timestamp_seconds`` for ``(role, certificate)`` pairs seen by ``source``."""
    rows = []
    for role, cert in certificates:
        due = renewal_point(cert.not_before, cert.not_after, _RENEWAL.get(role, _CA_RENEWAL))
        labels = (role, cert.subject, cert.fingerprint, source)
        rows.append((labels, cert.not_before, cert.not_after, due))
    return tuple(
        GaugeFamily(
            f"trustmesh_cert_{what}_timestamp_seconds",
            help_text,
            CERT_LABELS,
            tuple((labels, times[i].timestamp()) for labels, *times in rows),
        )
        for i, (what, help_text) in enumerate(
            (
                ("not_before", "NotBefore of a certificate, in seconds since the epoch."),
                ("not_after", "NotAfter of a certificate, in seconds since the epoch."),
                ("renewal_due", "When the certificate's renewal policy makes it due (epoch)."),
            )
        )
    )


def bundle_family(digest: str, source: str, name: str) -> GaugeFamily:
    """``<name>{digest,source} 1``: which trust bundle a component holds."""
    return GaugeFamily(
        name,
        "The trust bundle in use (value always 1).",
        ("digest", "source"),
        (((digest, source), 1.0),),
    )


__all__ = ["CERT_LABELS", "GaugeFamily", "bundle_family", "certificate_families"]
