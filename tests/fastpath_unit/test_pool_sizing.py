"""Pool sizing from demand (fastpath.pool_sizing): pure logic, no kernel."""

from __future__ import annotations

from fastpath.pool_sizing import HORIZON_S, MAX_DEPTH, MIN_DEPTH, SHRINK_AFTER_S, Demand


def test_idle_pool_stays_at_min() -> None:
    d = Demand()
    for i in range(100):
        assert d.observe(i * 0.02, 0, 0) == MIN_DEPTH


def test_grows_to_cover_the_bind_rate_over_the_refill_horizon() -> None:
    d = Demand()
    t = 0.0
    d.observe(t, 0, 0)
    for _ in range(50):  # 20 binds every 20 ms: 1000 per second
        t += 0.02
        target = d.observe(t, 20, 0)
    assert target == round(1000 * HORIZON_S)


def test_a_miss_grows_at_once_and_is_remembered() -> None:
    d = Demand()
    first = d.observe(0.0, 0, 0)
    grown = d.observe(0.02, 0, 6)  # 6 requests found it empty: more than the rate says
    assert grown >= first + 12
    assert d.observe(0.04, 0, 0) == grown  # no drop on the next quiet look


def test_bounded_by_max_depth() -> None:
    d = Demand()
    assert d.observe(0.01, 10_000, 10_000) == MAX_DEPTH


def test_shrinks_when_idle_halving_every_period() -> None:
    d = Demand()
    t = 0.0
    for _ in range(10):
        t += 0.01
        d.observe(t, 30, 0)  # 3000 per second
    top = d.target
    seen = [top]
    for _ in range(int(8 * SHRINK_AFTER_S / 0.1)):
        t += 0.1
        seen.append(d.observe(t, 0, 0))
    assert seen == sorted(seen, reverse=True)  # never grows while idle
    assert seen[-1] == MIN_DEPTH
    # half after one period, not all at once
    at_one_period = seen[int(SHRINK_AFTER_S / 0.1) + 2]
    assert top // 2 - 1 <= at_one_period <= top // 2 + 1


def test_a_burst_of_new_connections_sizes_for_the_next_burst() -> None:
    d = Demand()
    d.observe(0.0, 0, 0)
    target = d.observe(0.02, 16, 0)  # 16 kept-alive connections opened at once
    assert target >= 16
