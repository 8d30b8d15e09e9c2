"""How many free upstream sockets a pool should hold: sized from demand.

Owner: K2 (pools). Pure logic, no I/O: `fastpath.pools.Pools` feeds one
`Demand` per pool at each look of the agent (every few ms under load) with the
sockets clients took since the last look (binds seen in dp_peer, plus
sockets bound and already released in between) and the misses (sk_msg found
the pool empty: that request went to Envoy, and a kept-alive connection stays
there). The target is the peak demand rate times the time a refill takes to
catch up (HORIZON_S), so a pool holds what clients take while the background
refill is making the next sockets. The peak decays by half every
SHRINK_AFTER_S without a new peak: an idle pool shrinks back to MIN_DEPTH.

Why a rate and not the miss count alone: with one new connection per request
every request takes a socket, and a pool that only grows after it ran dry
sends the first requests of every burst to Envoy (measured: 534 of 4000
requests from 8 connection-per-request clients when growth was one socket per
miss, at most doubling per look).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_DEPTH = 4
MAX_DEPTH = 256  # = DP_POOL_DEPTH: the kernel queue of one pool holds no more
HORIZON_S = 0.1  # refill latency to cover: agent looks + making a batch, under load
SHRINK_AFTER_S = 5.0  # the demand peak halves after this long without a higher one
MIN_INTERVAL_S = 0.01  # a look sooner than this counts as this long (no rate spikes)
SMOOTH_S = 0.05  # time constant of the smoothed take rate


@dataclass
class Demand:
    """Demand seen by one pool; `observe` returns the pool's new target."""

    target: int = MIN_DEPTH
    rate: float = 0.0  # sockets taken per second, smoothed over SMOOTH_S
    peak: float = 0.0  # its peak (or what misses ask for), halving when idle
    peak_at: float = 0.0
    last_at: float | None = None
    taken_total: int = 0
    missed_total: int = 0

    def observe(self, now: float, taken: int, missed: int) -> int:
        """One look at `now` (monotonic seconds): `taken` sockets bound and
        `missed` requests that found the pool empty since the previous look."""
        self.taken_total += taken
        self.missed_total += missed
        dt = MIN_INTERVAL_S if self.last_at is None else max(now - self.last_at, MIN_INTERVAL_S)
        self.last_at = now
        a = min(1.0, dt / SMOOTH_S)  # smoothed: one look's noise is not a peak
        self.rate = a * (taken + missed) / dt + (1 - a) * self.rate
        rate = self.rate
        if missed:  # it ran dry: the rate under-counts what was asked
            rate = max(rate, (self.target + 2 * missed) / HORIZON_S)
        rate = min(rate, MAX_DEPTH / HORIZON_S)  # shrinking starts from the bound
        if rate >= self.peak:
            self.peak, self.peak_at = rate, now
        elif now - self.peak_at > SHRINK_AFTER_S:
            self.peak /= 2
            self.peak_at = now
        self.target = max(MIN_DEPTH, min(MAX_DEPTH, math.ceil(self.peak * HORIZON_S)))
        return self.target
