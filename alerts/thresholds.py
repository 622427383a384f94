"""The certificate alert thresholds of ``alerts/rules/certificates.yml``, evaluated in Python.

``trustmesh alerts check`` (cron, no Prometheus) and ``trustmesh check`` use this module; the
rule file is the same policy written in PromQL. ``tests/alerts/test_thresholds.py`` feeds the
same certificates to both (to this module directly, to the rules through ``promtool test
rules``) and requires identical alerts, so the two cannot drift apart.

Long-lived certificates (validity >= :data:`LONG_LIVED_SECONDS`) alert on days left; short-lived
ones on the share of their renewal window (renewal due -> NotAfter) that is left, because fixed
days never stop firing on a 48h issuer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DAY = 86400.0
WARNING_SECONDS = 30 * DAY
CRITICAL_SECONDS = 7 * DAY
LONG_LIVED_SECONDS = 120 * DAY
# Short-lived: warn once a quarter of the renewal window passed without a renewal, go critical
# when less than a quarter of it is left.
SHORT_WARNING_FRACTION = 0.75
SHORT_CRITICAL_FRACTION = 0.25

ROLES = ("trust_anchor", "issuer", "workload", "webhook", "other")

# role -> (warning alert, critical alert)
ALERTS_BY_ROLE: dict[str, tuple[str, str]] = {
    "trust_anchor": ("TrustAnchorExpiringSoon", "TrustAnchorExpiryCritical"),
    "issuer": ("IssuerExpiringSoon", "IssuerExpiryCritical"),
    "webhook": ("CertificateExpiringSoon", "CertificateExpiryCritical"),
    "other": ("CertificateExpiringSoon", "CertificateExpiryCritical"),
    "workload": ("WorkloadCertRenewalOverdue", "WorkloadCertExpired"),
}


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds since the epoch")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class CertTimes:
    """What the alerts know about one certificate: who it is and its three timestamps (seconds
    since the epoch). The label names are those of the exported metrics."""

    role: str
    subject: str
    fingerprint: str
    source: str
    not_before: float
    not_after: float
    renewal_due: float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("subject", "fingerprint", "source"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        if not self.fingerprint or not self.source:
            raise ValueError("fingerprint and source must not be empty")
        for name in ("not_before", "not_after", "renewal_due"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.not_after < self.not_before:
            raise ValueError(
                f"not_after ({self.not_after}) is before not_before ({self.not_before}) "
                f"for {self.subject!r}"
            )

    @property
    def labels(self) -> dict[str, str]:
        return {
            "role": self.role,
            "subject": self.subject,
            "fingerprint": self.fingerprint,
            "source": self.source,
        }

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    @property
    def long_lived(self) -> bool:
        return self.lifetime >= LONG_LIVED_SECONDS


@dataclass(frozen=True, slots=True)
class Firing:
    """An alert that fires for one certificate, with the value the rule's expression yields."""

    alertname: str
    cert: CertTimes
    value: float


def evaluate(cert: CertTimes, now: float) -> tuple[Firing, ...]:
    """The alerts of ``certificates.yml`` that fire for ``cert`` at ``now`` (epoch seconds)."""
    now = _finite("now", now)
    left = cert.not_after - now
    window = cert.not_after - cert.renewal_due
    warning, critical = ALERTS_BY_ROLE[cert.role]
    if cert.role == "workload":
        fired = []
        if 0 < left < SHORT_WARNING_FRACTION * window:
            fired.append(Firing(warning, cert, left))
        if -left > 0:
            fired.append(Firing(critical, cert, -left))
        return tuple(fired)
    if cert.long_lived:
        warn, crit = left < WARNING_SECONDS, left < CRITICAL_SECONDS
    else:
        warn = left < SHORT_WARNING_FRACTION * window
        crit = left < SHORT_CRITICAL_FRACTION * window
    return tuple(Firing(name, cert, left) for name, on in ((warning, warn), (critical, crit)) if on)


def evaluate_all(certs: tuple[CertTimes, ...] | list[CertTimes], now: float) -> tuple[Firing, ...]:
    """:func:`evaluate` over many certificates, in input order."""
    return tuple(f for cert in certs for f in evaluate(cert, now))
