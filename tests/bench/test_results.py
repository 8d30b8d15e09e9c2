"""ABAB schedule, medians and ratios, report and plots, from run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import plots, report, results
from benchmarks.plan import SCENARIOS, build_plan
from benchmarks.runner import Outcome


def run(cfg: str, p50: float, rps: float, rep: int = 0, scenario: str = "leaf",
        conns: int = 1, rate: float | None = None) -> dict:
    return {"configuration": cfg, "scenario": scenario, "connections": conns, "rep": rep,
            "load": "closed" if rate is None else "rate", "offered_rps": rate,
            "p50_us": p50, "p90_us": p50 * 1.5, "p99_us": p50 * 2, "rps": rps,
            "cpu_s_per_1k": 0.1, "kernel_share": None if cfg == "no-mesh" else 0.0,
            "requests": 1000, "errors": 0, "duration_s": 1.0, "sidecar_rss_mb": 0.0,
            "sidecars": 0, "counters": {}, "cdf": [[50, p50], [90, p50 * 1.5], [99, p50 * 2]]}


def test_schedule_is_abab_per_cell() -> None:
    plan = build_plan(quick=True, scenarios=["leaf"])
    order = list(plan.schedule(["a", "b"]))
    assert [n for _, _, n in order] == ["a", "b"] * len(plan.cells)
    plan = build_plan(quick=False, scenarios=["leaf"], repeats=3)
    order = list(plan.schedule(["a", "b"]))
    first = [(c.connections, rep, n) for c, rep, n in order[:6]]
    assert first == [(1, 0, "a"), (1, 0, "b"), (1, 1, "a"), (1, 1, "b"), (1, 2, "a"), (1, 2, "b")]
    assert plan.total(["a", "b"]) == len(order)


def test_plan_rejects_unknown_scenario_and_names_choices() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'.*leaf"):
        build_plan(quick=True, scenarios=["nope"])


def test_full_plan_covers_issue_points() -> None:
    plan = build_plan(quick=False)
    labels = {(c.scenario.name, c.connections, c.rate) for c in plan.cells}
    for conns in (1, 16, 64):
        assert ("leaf", conns, None) in labels and ("multihop", conns, None) in labels
    assert {s for s, _, _ in labels} >= set(SCENARIOS)
    assert any(rate for _, _, rate in labels)


def test_medians_and_ratios() -> None:
    runs = [run("sidecar", 300, 3000, 0), run("sidecar", 200, 4000, 1), run("sidecar", 250, 3500, 2),
            run("no-mesh", 50, 20000), run("sidecar-l4", 125, 7000)]
    rows = {r["configuration"]: r for r in results.summarize(runs)}
    assert rows["sidecar"]["p50_us"] == 250 and rows["sidecar"]["repeats"] == 3
    assert rows["sidecar-l4"]["p50_vs_sidecar"] == 0.5
    assert rows["sidecar-l4"]["rps_vs_sidecar"] == 2.0
    assert rows["sidecar"]["p50_vs_no-mesh"] == 5.0
    assert rows["no-mesh"]["kernel_share"] is None


def test_failed_runs_are_kept_raw_but_not_summarized() -> None:
    runs = [run("sidecar", 300, 3000), {"configuration": "l7fp", "scenario": "leaf",
                                        "connections": 1, "rep": 0, "offered_rps": None,
                                        "error": "boom"}]
    assert [r["configuration"] for r in results.summarize(runs)] == ["sidecar"]


def test_report_and_plots_from_a_document(tmp_path: Path) -> None:
    runs = [run(c, p, r) for c, p, r in (("no-mesh", 60, 15000), ("sidecar", 250, 4000),
                                         ("sidecar-l4", 200, 4500))]
    runs += [run(c, p, r, rate=1000, conns=16) for c, p, r in (("no-mesh", 80, 1000),
                                                                ("sidecar", 400, 1000))]
    outcome = Outcome(configurations=[
        {"name": "no-mesh", "status": "ok", "reason": ""},
        {"name": "l7fp", "status": "unavailable", "reason": "fast path missing"}], runs=runs)
    plan = build_plan(quick=True, scenarios=["leaf"])
    mach = {"cores": 2, "cpu_model": "x", "kernel": "k", "envoy": "1.40", "wrk": "wrk",
            "h2load": "h2load", "loadavg_start": (1.0, 1.0, 1.0)}
    doc = results.document(outcome, plan, mach, 0.0)
    json.loads(json.dumps(doc))  # serializable as results.json
    made = plots.draw_all(doc, tmp_path)
    assert sorted(made) == ["latency_cdf_leaf_c1.png", "latency_vs_load.png", "throughput.png"]
    for name in made:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.render(doc, made)
    assert "`l7fp`: unavailable — fast path missing" in text
    assert "| sidecar-l4 | 200 |" in text and "0.80x" in text  # 200 / 250 vs sidecar
    assert "## Rate sweep" in text and "![throughput.png](throughput.png)" in text


def test_demo_only_in_full_runs_unless_asked() -> None:
    assert not any(c.scenario.demo for c in build_plan(quick=True).cells)
    assert {c.connections for c in build_plan(quick=False).cells if c.scenario.demo} == {1, 16}
    assert [c.scenario.name for c in build_plan(quick=True, scenarios=["demo"]).cells] == ["demo"]
