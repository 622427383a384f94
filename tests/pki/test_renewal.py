"""The renewal policy at explicit times: fraction, renew-before, clamping, jitter bounds."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pki_testkit import T0, Chain

from pki.renewal import (
    PROXY_MAX_REFRESH,
    PROXY_MIN_REFRESH,
    RenewalAction,
    RenewalPolicy,
    decide,
    refresh_delay,
    renewal_point,
)

NB = T0
NA = T0 + timedelta(hours=24)


def test_default_is_two_thirds_of_the_life() -> None:
    assert renewal_point(NB, NA, RenewalPolicy()) == NB + timedelta(hours=16)


def test_renew_before_and_the_earlier_point_wins() -> None:
    assert renewal_point(NB, NA, RenewalPolicy(fraction=None, renew_before=timedelta(hours=2))) == (
        NA - timedelta(hours=2)
    )
    both = RenewalPolicy(fraction=0.9, renew_before=timedelta(hours=12))
    assert renewal_point(NB, NA, both) == NA - timedelta(hours=12)


def test_clamped_to_the_validity_window() -> None:
    # renew_before longer than the life: renew at NotBefore, never earlier
    policy = RenewalPolicy(fraction=None, renew_before=timedelta(days=30))
    assert renewal_point(NB, NA, policy) == NB
    # jitter cannot push the point before NotBefore either
    wild = RenewalPolicy(fraction=0.1, jitter=0.9)
    assert renewal_point(NB, NA, wild, jitter_sample=0.99) == NB


@given(st.floats(0.05, 0.95), st.floats(0.0, 0.99), st.floats(0.0, 0.999))
def test_jitter_only_moves_the_point_earlier_and_boundedly(
    fraction: float, jitter: float, sample: float
) -> None:
    policy = RenewalPolicy(fraction=fraction, jitter=jitter)
    base = renewal_point(NB, NA, RenewalPolicy(fraction=fraction))
    point = renewal_point(NB, NA, policy, jitter_sample=sample)
    assert NB <= point <= base
    assert base - point <= (NA - NB) * jitter + timedelta(microseconds=1)


def test_decisions_at_explicit_times(ecdsa_chain: Chain) -> None:
    leaf = ecdsa_chain.leaf.certificate
    policy = RenewalPolicy()
    point = renewal_point(leaf.not_before, leaf.not_after, policy)
    wait = decide(leaf, policy, point - timedelta(seconds=1))
    assert wait.action is RenewalAction.WAIT and not wait.due and wait.renew_at == point
    assert decide(leaf, policy, point).action is RenewalAction.RENEW_NOW
    expired = decide(leaf, policy, leaf.not_after)
    assert expired.action is RenewalAction.EXPIRED and expired.due
    assert expired.remaining == timedelta(0)
    # the chain's earliest expiry overrides the certificate's own NotAfter
    early = decide(leaf, policy, T0 + timedelta(hours=2), not_after=T0 + timedelta(hours=3))
    assert early.action is RenewalAction.RENEW_NOW


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": None},
        {"fraction": 0.0},
        {"fraction": 1.0},
        {"renew_before": timedelta(0)},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_invalid_policies(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


def test_invalid_points() -> None:
    with pytest.raises(ValueError, match="jitter_sample"):
        renewal_point(NB, NA, RenewalPolicy(), jitter_sample=1.0)
    with pytest.raises(ValueError, match="NotAfter"):
        renewal_point(NA, NB, RenewalPolicy())


def test_proxy_refresh_delay_is_clamped() -> None:
    assert refresh_delay(T0 + timedelta(hours=10), T0) == timedelta(hours=7)
    assert refresh_delay(T0 + timedelta(seconds=5), T0) == PROXY_MIN_REFRESH
    assert refresh_delay(T0 + timedelta(days=30), T0) == PROXY_MAX_REFRESH
    assert refresh_delay(None, T0) == PROXY_MIN_REFRESH
    assert refresh_delay(T0 - timedelta(hours=1), T0) == PROXY_MIN_REFRESH
