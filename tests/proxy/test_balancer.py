"""Peak-EWMA P2C: a slow endpoint gets a small share; estimates peak and decay as specified."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest

import proxy.outbound as outbound_module
from proxy.balancer import DEFAULT_DECAY, DEFAULT_RTT, EndpointLoad, PeakEwmaBalancer
from proxy.errors import ConfigError, NoEndpoints
from proxy.metrics import ProxyMetrics
from proxy.outbound import Outbound
from proxy.routes import Endpoint, Service, StaticRoutes
from proxy.upstream import Connector


def simulate(
    latency: dict[str, float], *, requests: int, interval: float, seed: int
) -> Counter[str]:
    """Open-loop load: one request every ``interval`` s, each taking its endpoint's latency."""
    bal = PeakEwmaBalancer(latency, now=0.0, rng=random.Random(seed))
    inflight: list[tuple[float, float, str]] = []  # (done_at, started_at, endpoint)
    shares: Counter[str] = Counter()
    for k in range(requests):
        now = k * interval
        while inflight and inflight[0][0] <= now:
            done, started, ep = heapq.heappop(inflight)
            bal.complete(ep, started, done)
        ep = bal.pick(now)
        shares[ep] += 1
        heapq.heappush(inflight, (now + latency[ep], now, ep))
    return shares


def test_slow_endpoint_gets_a_small_share() -> None:
    shares = simulate(
        {"fast-a": 0.005, "fast-b": 0.005, "slow": 0.200},
        requests=20_000,
        interval=0.002,
        seed=7,
    )
    total = sum(shares.values())
    assert shares["slow"] / total < 0.05, shares
    assert abs(shares["fast-a"] - shares["fast-b"]) / total < 0.1, shares


def test_equal_endpoints_share_evenly() -> None:
    shares = simulate({e: 0.01 for e in "abcd"}, requests=8_000, interval=0.004, seed=1)
    assert min(shares.values()) > 0.2 * 8_000, shares


def test_defaults_are_linkerds() -> None:
    assert DEFAULT_RTT == 0.030
    assert DEFAULT_DECAY == 10.0
    bal = PeakEwmaBalancer(["a"], now=5.0)
    assert bal.state("a").rtt == DEFAULT_RTT
    assert bal.load("a", 5.0) == pytest.approx(DEFAULT_RTT)


def test_peak_then_decay() -> None:
    bal = PeakEwmaBalancer(["a"], now=0.0, decay=10.0)
    assert bal.pick(0.0) == "a"
    assert bal.load("a", 0.0) == pytest.approx(2 * DEFAULT_RTT)  # one pending
    bal.complete("a", 0.0, 0.5)  # 500 ms: a peak replaces the estimate at once
    assert bal.state("a").rtt == pytest.approx(0.5)
    bal.pick(10.5)
    bal.complete("a", 10.5, 10.5)  # an instant reply, 10 s later: weight exp(-1)
    assert bal.state("a").rtt == pytest.approx(0.5 * math.exp(-1))
    # With no traffic the estimate decays towards zero.
    assert bal.load("a", 20.5) == pytest.approx(0.5 * math.exp(-1) * math.exp(-1))


def test_busy_endpoint_is_avoided() -> None:
    bal = PeakEwmaBalancer(["a", "b"], now=0.0, rng=random.Random(3))
    for _ in range(5):
        bal.state("a").pending += 1
    assert [bal.pick(0.0) for _ in range(5)] == ["b"] * 5  # until b is as busy as a


def test_set_endpoints_keeps_state_and_ignores_removed() -> None:
    bal = PeakEwmaBalancer(["a", "b"], now=0.0)
    bal.pick(0.0)
    bal.complete("a", 0.0, 1.0)
    bal.set_endpoints(["a", "c"], now=2.0)
    assert bal.endpoints == ("a", "c")
    assert bal.state("a").rtt == pytest.approx(1.0)
    assert bal.state("c").rtt == DEFAULT_RTT
    bal.complete("b", 0.0, 3.0)  # finished after removal: ignored


def test_errors() -> None:
    with pytest.raises(NoEndpoints):
        PeakEwmaBalancer([], now=0.0).pick(0.0)
    with pytest.raises(ConfigError, match="decay"):
        PeakEwmaBalancer(["a"], now=0.0, decay=0)
    with pytest.raises(ConfigError, match="default_rtt"):
        PeakEwmaBalancer(["a"], now=0.0, default_rtt=-1)


def test_complete_matches_endpoint_load_observe() -> None:
    """complete() inlines EndpointLoad.observe: the same outcomes give the same estimates."""
    rng = random.Random(3)
    bal = PeakEwmaBalancer(["a", "b"], now=0.0, rng=random.Random(1))
    ref = {"a": EndpointLoad(DEFAULT_RTT, 0.0), "b": EndpointLoad(DEFAULT_RTT, 0.0)}
    now = 0.0
    for _ in range(2000):
        ep = bal.pick(now)
        started = now
        now += rng.choice((0.0, 0.0005, 0.01, 0.2, 3.0))
        bal.complete(ep, started, now)
        ref[ep].observe(max(0.0, now - started), now, DEFAULT_DECAY)
        assert bal.state(ep).rtt == ref[ep].rtt and bal.state(ep).updated_at == now
        assert bal.state(ep).pending == 0


async def test_the_outbound_side_keeps_a_bounded_number_of_balancers(monkeypatch) -> None:
    """One balancer per service name routed to, for the proxy's life: with services coming
    and going that grew without end. Past MAX_BALANCERS the map starts over."""
    monkeypatch.setattr(outbound_module, "MAX_BALANCERS", 8)
    out = Outbound(StaticRoutes(), Connector(None, ProxyMetrics(), direction="outbound"),
                   ProxyMetrics())  # fmt: skip
    for n in range(20):
        svc = Service(f"svc-{n}", (Endpoint("127.0.0.1", 1000 + n),))
        assert out.balancer(svc, 0.0) is out.balancer(svc, 1.0)  # kept while in use
        assert len(out._balancers) <= 8


def test_an_endpoint_that_failed_to_connect_is_down_until_a_connection_succeeds() -> None:
    """Linkerd's balancer holds an endpoint unready while it reconnects: ours leaves it out of
    the picks until connected(), whatever the time, and failed() gives the connect backoff
    before the next try (100 ms doubling to 500 ms, 10 % jitter)."""
    bal = PeakEwmaBalancer(["dead", "good"], now=0.0, rng=random.Random(5))
    assert bal.available() and not bal.is_down("dead")
    backoffs = []
    for _ in range(5):
        backoffs.append(bal.failed("dead", picked=False))
    for got, want in zip(backoffs, (0.1, 0.2, 0.4, 0.5, 0.5), strict=True):
        assert got is not None and want * 0.9 <= got <= want * 1.1, backoffs
    assert len(set(backoffs)) == 5  # jittered
    assert bal.is_down("dead") and bal.state("dead").failures == 5
    # Out of every pick, however long ago it failed and however loaded the other one is.
    bal.state("good").pending = 1000
    for now in (0.5, 60.0, 3600.0):
        assert bal.load("dead", now) == math.inf
        assert {bal.pick(now) for _ in range(50)} == {"good"}
    bal.state("good").pending = 0
    # A request's pick that fails is no longer pending there; a reconnection's try was no pick.
    bal.connected("dead")
    bal.state("dead").pending = 2
    bal.failed("dead")
    bal.failed("dead", picked=False)
    assert bal.state("dead").pending == 1
    # A connection that succeeds puts it back and clears the count; a completed request
    # (perhaps on a connection opened before it went down) does neither.
    bal.state("dead").pending = 0
    bal.complete("dead", 0.0, 0.01)
    assert bal.is_down("dead") and bal.state("dead").failures == 2
    bal.connected("dead")
    assert not bal.is_down("dead") and bal.state("dead").failures == 0
    assert bal.load("dead", 1.0) < math.inf
    assert bal.failed("gone") is None and not bal.is_down("gone")
    bal.connected("gone")  # an endpoint no longer in the set: nothing to do
    # Every endpoint down: picks go on (a connection attempt finds out), spread at random,
    # and available() says so.
    for ep in ("dead", "good"):
        bal.failed(ep, picked=False)
    assert not bal.available()
    assert {bal.pick(1.0) for _ in range(50)} == {"dead", "good"}
    # Among many, when both of a pair are down, the least loaded of the rest is picked.
    many = PeakEwmaBalancer([f"e{i}" for i in range(10)], now=0.0, rng=random.Random(2))
    for i in range(9):
        many.failed(f"e{i}", picked=False)
    assert {many.pick(0.05) for _ in range(100)} == {"e9"}
    # An endpoint that stays in a new set stays down; one that leaves and comes back is new.
    many.set_endpoints([f"e{i}" for i in range(5)], now=1.0)
    assert many.is_down("e0")
    many.set_endpoints(["e9"], now=1.0)
    many.set_endpoints(["e0", "e9"], now=1.0)
    assert not many.is_down("e0")


def test_a_pick_can_avoid_the_endpoint_a_retry_came_from() -> None:
    """A retry goes elsewhere whenever there is an elsewhere: the faster endpoint would
    otherwise win every pick, and one answering 503s quickly looks fastest of all."""
    bal = PeakEwmaBalancer(["fast-but-failing", "slow"], now=0.0, rng=random.Random(3))
    bal.state("slow").rtt = 1.0
    assert {bal.pick(0.0) for _ in range(20)} == {"fast-but-failing"}
    assert {bal.pick(0.0, avoid="fast-but-failing") for _ in range(20)} == {"slow"}
    many = PeakEwmaBalancer([f"e{i}" for i in range(5)], now=0.0, rng=random.Random(4))
    assert "e2" not in {many.pick(0.0, avoid="e2") for _ in range(200)}
    single = PeakEwmaBalancer(["only"], now=0.0)
    assert single.pick(0.0, avoid="only") == "only"  # nowhere else to go
    bal.failed("slow", picked=False)
    assert bal.pick(0.0, avoid="fast-but-failing") == "fast-but-failing"  # the other is down
