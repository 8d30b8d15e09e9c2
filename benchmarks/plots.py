"""PNG plots of a results.json document (matplotlib, Agg backend, no display).

Called by `benchmarks.cli` after a run; returns the file names written so
the report can embed them. Every plot is drawn only from measured runs.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.configs import NAMES

COLORS = {"no-mesh": "#4c72b0", "sidecar": "#c44e52", "sidecar-l4": "#dd8452", "l7fp": "#55a868"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose p50 is the median of the group: its CDF represents the repeats."""
    mid = statistics.median_low(r["p50_us"] for r in runs)
    return next(r for r in runs if r["p50_us"] == mid)


def cdf_plot(runs: list[dict[str, Any]], out: Path) -> str | None:
    """Latency CDF per configuration for leaf at the fewest connections measured."""
    ok = [r for r in runs if "error" not in r and r["scenario"] == "leaf" and r["load"] == "closed"]
    if not ok:
        return None
    conns = min(r["connections"] for r in ok)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in NAMES:
        group = [r for r in ok if r["configuration"] == name and r["connections"] == conns]
        if not group:
            continue
        cdf = _median_run(group)["cdf"]
        ax.plot([v for _, v in cdf], [p for p, _ in cdf], marker=".", label=name,
                color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("percentile")
    ax.set_title(f"leaf service, {conns} connection(s): latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    name = f"latency_cdf_leaf_c{conns}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def load_plot(summary: list[dict[str, Any]], out: Path) -> str | None:
    """p50 and p99 against the offered rate of the sweep (achieved rates are in report.md)."""
    swept = [r for r in summary if r["offered_rps"] is not None]
    if not swept:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in NAMES:
        rows = sorted((r for r in swept if r["configuration"] == name), key=lambda r: r["offered_rps"])
        if not rows:
            continue
        xs = [r["offered_rps"] for r in rows]
        ax.plot(xs, [r["p50_us"] for r in rows], marker="o", color=COLORS.get(name),
                label=f"{name} p50")
        ax.plot(xs, [r["p99_us"] for r in rows], marker="x", linestyle="--",
                color=COLORS.get(name), label=f"{name} p99")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("offered load (req/s, log scale; a configuration past its capacity "
                  "achieves less)")
    ax.set_ylabel("latency (µs, log scale)")
    ax.set_title("leaf service: latency against offered load (h2load rate sweep)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=110)
    plt.close(fig)
    return "latency_vs_load.png"


def throughput_plot(summary: list[dict[str, Any]], out: Path) -> str | None:
    """Grouped bars: throughput per configuration at each closed-loop point."""
    closed = [r for r in summary if r["offered_rps"] is None]
    if not closed:
        return None
    points: list[tuple[str, int]] = []
    for r in closed:
        if (r["scenario"], r["connections"]) not in points:
            points.append((r["scenario"], r["connections"]))
    names = [n for n in NAMES if any(r["configuration"] == n for r in closed)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(points) + 2), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [next((r["rps"] for r in closed if r["configuration"] == name
                      and (r["scenario"], r["connections"]) == p), 0) for p in points]
        ax.bar([j + i * width for j in range(len(points))], vals, width, label=name,
               color=COLORS.get(name))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(points))])
    ax.set_xticklabels([f"{s}\nc={c}" for s, c in points], fontsize=8)
    ax.set_ylabel("throughput (req/s, median)")
    ax.set_title("closed-loop throughput (wrk)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    return "throughput.png"


def draw_all(doc: dict[str, Any], out: Path) -> list[str]:
    made = [cdf_plot(doc["runs"], out), load_plot(doc["summary"], out),
            throughput_plot(doc["summary"], out)]
    return [m for m in made if m]
