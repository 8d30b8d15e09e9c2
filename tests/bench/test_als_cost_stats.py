"""benchmarks.als_cost's summaries over measured rows (pure): per-round
ratios to the same round's run without the logger, and the best round."""

from __future__ import annotations

from benchmarks.als_cost import best, ratios


def _row(p50: float, rps: float, cpu: float) -> dict[str, float]:
    return {"p50_us": p50, "rps": rps, "envoy_cpu_us_per_request": cpu}


def test_ratios_pair_each_round_with_its_own_baseline():
    got = {("no_als", 1): [_row(70, 10000, 40), _row(140, 5000, 80), _row(75, 9000, 0)],
           ("als", 1): [_row(84, 7000, 50), _row(154, 4000, 90), _row(90, 6300, 55)]}
    # rounds 2x apart in load: each ratio is taken inside its own round
    assert ratios(got) == {"als_c1": {"p50_us": 1.2, "rps": 0.7, "envoy_cpu_us_per_request": 1.19}}


def test_ratios_skip_unpaired_and_best_takes_the_least_disturbed_round():
    got = {("no_als", 16): [_row(800, 15000, 30), _row(1600, 8000, 40)],
           ("als", 16): [_row(900, 12000, 40)]}
    assert ratios(got) == {}
    assert best(got)["no_als_c16"] == {"p50_us": 800, "rps": 15000, "envoy_cpu_us_per_request": 30}
