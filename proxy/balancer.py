"""Peak-EWMA power-of-two-choices load balancing (Linkerd's and tower's algorithm), pure.

Each endpoint carries a latency estimate that jumps up to any slower observation at once
(the "peak") and otherwise decays exponentially towards newer, faster observations with time
constant ``decay``. Its load is ``estimate * (pending + 1)``. A pick draws two distinct
endpoints at random and takes the one with the lower load, so a slow or busy endpoint quickly
gets a small share without any one endpoint being starved of probes. Time is always passed in
(seconds on any monotonic clock); randomness comes from the ``rng`` the caller provides.

An endpoint that could not be connected to (:meth:`PeakEwmaBalancer.failed`) is *down*: out of
the picks, unless every endpoint is down, until a new connection to it succeeds
(:meth:`PeakEwmaBalancer.connected`), as Linkerd's balancer holds an endpoint unready while it
reconnects. ``failed`` returns how long to wait before the next connection attempt, the connect
backoff growing with the consecutive failures: 100 ms doubling to 500 ms, 10 % jitter
(Linkerd's). The caller reconnects in the background (``proxy.outbound``), so no request waits
on an endpoint that is down.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import ConfigError, NoEndpoints

# Linkerd's defaults (linkerd/app/outbound, BalanceP2c.peak_ewma).
DEFAULT_RTT = 0.030
DEFAULT_DECAY = 10.0
# Linkerd's outbound connect backoff (DEFAULT_OUTBOUND_CONNECT_BACKOFF).
BACKOFF_MIN = 0.1
BACKOFF_MAX = 0.5
BACKOFF_JITTER = 0.1
_exp = math.exp

E = TypeVar("E", bound=Hashable)


@dataclass(slots=True)
class EndpointLoad:
    """Mutable load state of one endpoint (owned by the balancer, read by tests and metrics)."""

    rtt: float
    updated_at: float
    pending: int = 0
    failures: int = 0  # connection failures in a row
    down: bool = False  # out of the picks until a connection to it succeeds

    def decayed(self, now: float, decay: float) -> float:
        """The estimate decayed towards zero for the time since its last update."""
        elapsed = max(0.0, now - self.updated_at)
        return self.rtt * math.exp(-elapsed / decay)

    def observe(self, rtt: float, now: float, decay: float) -> None:
        if rtt > self.rtt:
            self.rtt = rtt  # peak: a slower observation takes effect at once
        else:
            weight = math.exp(-max(0.0, now - self.updated_at) / decay)
            self.rtt = self.rtt * weight + rtt * (1.0 - weight)
        self.updated_at = now


class PeakEwmaBalancer(Generic[E]):
    """Power-of-two-choices over endpoints weighted by peak-EWMA latency and in-flight count.

    Call :meth:`pick` for each request (it counts the request as pending on the chosen
    endpoint) and :meth:`complete` with the start time when its response head arrives or
    it fails.
    """

    __slots__ = ("_decay", "_default_rtt", "_endpoints", "_loads", "_rng")

    def __init__(
        self,
        endpoints: Iterable[E] = (),
        *,
        now: float,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        rng: random.Random | None = None,
    ) -> None:
        if not default_rtt > 0:
            raise ConfigError(f"default_rtt must be positive, got {default_rtt!r}")
        if not decay > 0:
            raise ConfigError(f"decay must be positive, got {decay!r}")
        self._default_rtt = float(default_rtt)
        self._decay = float(decay)
        self._rng = rng if rng is not None else random.Random()
        self._loads: dict[E, EndpointLoad] = {}
        self._endpoints: list[E] = []
        self.set_endpoints(endpoints, now=now)

    @property
    def endpoints(self) -> tuple[E, ...]:
        return tuple(self._endpoints)

    def set_endpoints(self, endpoints: Iterable[E], *, now: float) -> None:
        """Replace the endpoint set; endpoints that stay keep their load state."""
        new = list(dict.fromkeys(endpoints))
        self._loads = {
            ep: self._loads.get(ep) or EndpointLoad(self._default_rtt, now) for ep in new
        }
        self._endpoints = new

    def load(self, endpoint: E, now: float) -> float:
        """The current cost of ``endpoint``: decayed RTT estimate times (pending + 1)."""
        state = self._loads[endpoint]
        if state.down:
            return math.inf
        return state.decayed(now, self._decay) * (state.pending + 1)

    def state(self, endpoint: E) -> EndpointLoad:
        return self._loads[endpoint]

    def pick(self, now: float, avoid: E | None = None) -> E:
        """Choose an endpoint for one request and count the request as pending on it. With
        ``avoid`` (the endpoint a retry's try before went to), the other of the pair is taken
        where P2C would have chosen it, unless that one is down: another endpoint whenever
        there is one up."""
        eps = self._endpoints
        n = len(eps)
        if n == 0:
            raise NoEndpoints("the service has no endpoints to balance over")
        if n == 1:
            chosen = eps[0]
        else:
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = eps[i], eps[j]
            load_a, load_b = self.load(a, now), self.load(b, now)
            chosen = a if load_a <= load_b else b
            if load_a == load_b == math.inf:  # both down: the least loaded of the rest
                best = min(eps, key=lambda ep: self.load(ep, now))
                if self._loads[best].down:
                    best = a  # every endpoint down: a connection attempt finds out (random)
                chosen = best
            if avoid is not None and chosen == avoid:
                other = b if chosen == a else a
                if not self._loads[other].down:
                    chosen = other
        self._loads[chosen].pending += 1
        return chosen

    def failed(self, endpoint: E, *, picked: bool = True) -> float | None:
        """A connection to ``endpoint`` failed: it is down (out of the picks) until
        :meth:`connected`. ``picked``: the attempt was a request's pick, which is no longer
        pending there. Returns the seconds to wait before trying to connect again (the
        connect backoff), or None when ``endpoint`` is not in the set."""
        state = self._loads.get(endpoint)
        if state is None:
            return None
        if picked and state.pending > 0:
            state.pending -= 1
        state.failures += 1
        state.down = True
        backoff = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(state.failures - 1, 16))
        return backoff * (1.0 + BACKOFF_JITTER * (2.0 * self._rng.random() - 1.0))

    def connected(self, endpoint: E) -> None:
        """A new connection to ``endpoint`` succeeded: it is back in the picks."""
        state = self._loads.get(endpoint)
        if state is not None:
            state.down = False
            state.failures = 0

    def is_down(self, endpoint: E) -> bool:
        """Whether ``endpoint`` is in the set and down (see :meth:`failed`)."""
        state = self._loads.get(endpoint)
        return state is not None and state.down

    def available(self) -> bool:
        """Whether some endpoint is not down."""
        return any(not state.down for state in self._loads.values())

    def complete(self, endpoint: E, started_at: float, now: float) -> None:
        """Record the outcome of a request picked at ``started_at`` (latency = now - start)."""
        state = self._loads.get(endpoint)
        if state is None:  # removed from the set while the request was in flight
            return
        if state.pending > 0:
            state.pending -= 1
        # EndpointLoad.observe, inlined: this runs once per request.
        rtt = now - started_at
        if rtt > state.rtt:
            state.rtt = rtt
        else:
            elapsed = now - state.updated_at
            weight = _exp(-elapsed / self._decay) if elapsed > 0.0 else 1.0
            state.rtt = state.rtt * weight + (rtt if rtt > 0.0 else 0.0) * (1.0 - weight)
        state.updated_at = now
