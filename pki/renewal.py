"""The renewal policy, pure: ``(validity window, policy, now) -> decision``.

One piece of code decides for the proxy's workload certificate, the rotation cron job and the
alerts. Jitter is a number in [0, 1) the caller draws (so tests pass it explicitly); it only
moves the renewal point earlier, by at most ``jitter × lifetime``, so spreading a fleet's
renewals never makes one late.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from pki.certs import Certificate

DEFAULT_FRACTION = 2 / 3  # renew with one third of the life left (the cron job's default)


class RenewalAction(enum.Enum):
    WAIT = "wait"  # not due; renew at ``renew_at``
    RENEW_NOW = "renew"  # renewal point passed, certificate still valid
    EXPIRED = "expired"  # past NotAfter: renewal is overdue and the certificate is unusable


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """When to renew: at ``fraction`` of the lifetime, or ``renew_before`` NotAfter.

    When both are set, the earlier point wins. ``jitter`` is the largest share of the lifetime
    by which the point may be moved earlier.
    """

    fraction: float | None = DEFAULT_FRACTION
    renew_before: timedelta | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.fraction is None and self.renew_before is None:
            raise ValueError("a renewal policy needs a fraction or a renew_before duration")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if self.renew_before is not None and self.renew_before <= timedelta(0):
            raise ValueError(f"renew_before must be positive, got {self.renew_before}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")


@dataclass(frozen=True, slots=True)
class RenewalDecision:
    action: RenewalAction
    renew_at: datetime
    expires_at: datetime
    now: datetime

    @property
    def due(self) -> bool:
        return self.action is not RenewalAction.WAIT

    @property
    def remaining(self) -> timedelta:
        return self.expires_at - self.now


def renewal_point(
    not_before: datetime, not_after: datetime, policy: RenewalPolicy, jitter_sample: float = 0.0
) -> datetime:
    """The instant renewal becomes due, never before NotBefore nor after NotAfter."""
    if not 0.0 <= jitter_sample < 1.0:
        raise ValueError(f"jitter_sample must be in [0, 1), got {jitter_sample}")
    lifetime = not_after - not_before
    if lifetime <= timedelta(0):
        raise ValueError("certificate NotAfter is not after its NotBefore")
    points = []
    if policy.fraction is not None:
        points.append(not_before + lifetime * policy.fraction)
    if policy.renew_before is not None:
        points.append(not_after - policy.renew_before)
    point = min(points) - lifetime * (policy.jitter * jitter_sample)
    return min(max(point, not_before), not_after)


def decide(
    cert: Certificate,
    policy: RenewalPolicy,
    now: datetime,
    *,
    jitter_sample: float = 0.0,
    not_after: datetime | None = None,
) -> RenewalDecision:
    """Decide for ``cert`` at ``now``. ``not_after`` overrides the expiry (e.g. a chain's earliest)."""
    expires = not_after if not_after is not None else cert.not_after
    at = renewal_point(cert.not_before, expires, policy, jitter_sample)
    if now >= expires:
        action = RenewalAction.EXPIRED
    elif now >= at:
        action = RenewalAction.RENEW_NOW
    else:
        action = RenewalAction.WAIT
    return RenewalDecision(action, at, expires, now)


# The proxy's refresh schedule (Linkerd's): 70 % of the time remaining, clamped to [10 s, 24 h].
PROXY_REFRESH_FRACTION = 0.7
PROXY_MIN_REFRESH = timedelta(seconds=10)
PROXY_MAX_REFRESH = timedelta(hours=24)


def refresh_delay(
    expires_at: datetime | None,
    now: datetime,
    *,
    fraction: float = PROXY_REFRESH_FRACTION,
    min_refresh: timedelta = PROXY_MIN_REFRESH,
    max_refresh: timedelta = PROXY_MAX_REFRESH,
) -> timedelta:
    """How long a proxy sleeps before asking for a new certificate."""
    if expires_at is None or expires_at <= now:
        return min_refresh
    delay = (expires_at - now) * fraction
    return max(min_refresh, min(max_refresh, delay))
