"""report.md: the run's tables in Markdown, from a results.json document.

Pure: `render(doc, plots)` returns text. Called by `benchmarks.cli` after a
run, and usable on an old results.json (`python -m benchmarks.report FILE`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.configs import NAMES


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: NAMES.index(r["configuration"])
                  if r["configuration"] in NAMES else 99)


def point_table(rows: list[dict[str, Any]],
                missing: dict[str, str] | None = None) -> list[str]:
    """One table: the configurations at one load point, with ratios to both baselines.

    `missing` maps a configuration without figures to the reason, shown as its row.
    """
    out = ["| configuration | p50 µs | p50 range over repeats | p90 µs | p99 µs | req/s | CPU s/1k req | sidecar RSS MB "
           "| kernel share | p50 vs sidecar | p50 vs no-mesh | req/s vs sidecar | req/s vs no-mesh |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in _order(rows):
        share = "–" if r["kernel_share"] is None else f"{r['kernel_share']:.0%}"
        out.append(
            f"| {r['configuration']} | {_fmt(r['p50_us'])} "
            f"| {_fmt(r.get('p50_min_us'))}–{_fmt(r.get('p50_max_us'))} | {_fmt(r['p90_us'])} "
            f"| {_fmt(r['p99_us'])} | {_fmt(r['rps'])} | {_fmt(r['cpu_s_per_1k'], 3)} "
            f"| {_fmt(r['sidecar_rss_mb'], 0) if r['sidecar_rss_mb'] else '–'} | {share} "
            f"| {_ratio(r['p50_vs_sidecar'])} | {_ratio(r['p50_vs_no-mesh'])} "
            f"| {_ratio(r['rps_vs_sidecar'])} | {_ratio(r['rps_vs_no-mesh'])} |")
    for name, reason in (missing or {}).items():
        out.append(f"| {name} | {reason} |" + " |" * 12)
    return out


def headline(doc: dict[str, Any]) -> list[str]:
    """The single-hop leaf at 1 connection: every configuration side by side."""
    rows = [r for r in doc["summary"] if r["scenario"] == "leaf" and r["connections"] == 1
            and r["offered_rps"] is None]
    if not rows:
        return []
    have = {r["configuration"] for r in rows}
    missing = {c["name"]: f"no figures: {c['status']}"
               + (f" ({c['reason']})" if c["reason"] else "")
               for c in doc["configurations"]
               if c["name"] not in have and c.get("scope", "pods") == "pods"}
    return ["## Headline: single-hop leaf, 1 connection", "", *point_table(rows, missing)]


def _points(summary: list[dict[str, Any]]) -> list[tuple[str, int, float | None]]:
    seen: list[tuple[str, int, float | None]] = []
    for r in summary:
        key = (r["scenario"], r["connections"], r["offered_rps"])
        if key not in seen:
            seen.append(key)
    return seen


def render(doc: dict[str, Any], plots: list[str]) -> str:
    m, plan = doc["machine"], doc["plan"]
    lines = [f"# L7FP benchmark, {doc['started_utc']}", ""]
    if doc.get("interrupted"):
        lines += ["**Interrupted** (Ctrl-C): the tables hold only the runs that finished.", ""]
    lines += [
        f"Machine: {m['cores']} cores ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Envoy {m['envoy']}, {m['wrk']}, {m['h2load']}; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
        "(a shared machine: compare ratios, measured side by side, not absolute figures).",
        "",
        f"Plan: {'quick' if plan['quick'] else 'full'}, {plan['repeats']} repeat(s) of "
        f"{plan['duration_s']:g} s per point and configuration, in ABAB order "
        "(every configuration once per repeat, same order); figures are medians over "
        f"the repeats; wall time {doc['wall_s']:.0f} s. no-mesh, sidecar and sidecar-l4 ran on "
        + ("the local mesh runner (`--substrate mesh`)" if plan.get("substrate") == "mesh"
           else "the harness's own pods") + "; l7fp on the local mesh runner.",
        "",
        "## Configurations", "",
    ]
    for c in doc["configurations"]:
        scope = " (demo mesh)" if c.get("scope") == "demo" else ""
        lines.append(f"- `{c['name']}`{scope}: {c['status']}"
                     + (f" — {c['reason']}" if c["reason"] else ""))
    failed = [r for r in doc["runs"] if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed:"]
        lines += [f"- {r['configuration']} {r['scenario']} c={r['connections']}: {r['error']}"
                  for r in failed[:20]]
    top = headline(doc)
    if top:
        lines += ["", *top]
    summary = doc["summary"]
    closed = [p for p in _points(summary) if p[2] is None]
    swept = [p for p in _points(summary) if p[2] is not None]
    for point in closed:
        rows = [r for r in summary if (r["scenario"], r["connections"], r["offered_rps"]) == point]
        lines += ["", f"## {point[0]}, {point[1]} connection(s), closed loop (wrk)", "",
                  *point_table(rows)]
    if swept:
        lines += ["", "## Rate sweep (h2load, HTTP/1.1, leaf)", "",
                  "| offered req/s | configuration | achieved req/s | p50 µs | p90 µs | p99 µs |",
                  "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for point in swept:
            for r in _order([r for r in summary
                             if (r["scenario"], r["connections"], r["offered_rps"]) == point]):
                lines.append(f"| {_fmt(point[2])} | {r['configuration']} | {_fmt(r['rps'])} "
                             f"| {_fmt(r['p50_us'])} | {_fmt(r['p90_us'])} | {_fmt(r['p99_us'])} |")
    lines += _bypass_lines(doc["runs"])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Columns: latency percentiles from wrk's histogram (closed loop) or h2load's "
              "per-request log (rate sweep); CPU s/1k req is the cgroup CPU time of every app "
              "and sidecar (load generator excluded) per 1,000 requests; sidecar RSS is the sum "
              "over the mesh's sidecars; kernel share is the share of requests whose L7 policy "
              "the kernel enforced (– where there is no policy); ratios are this configuration's "
              "median over the baseline's median at the same point.", ""]
    return "\n".join(lines)


def _bypass_lines(runs: list[dict[str, Any]]) -> list[str]:
    totals: dict[str, int] = {}
    for r in runs:
        if r.get("configuration") == "sidecar-l4":
            for k, v in r.get("counters", {}).items():
                totals[k] = totals.get(k, 0) + v
    if not totals:
        return []
    return ["", "sidecar-l4 bypass counters over all its runs: "
            + ", ".join(f"{k} {v:,}" for k, v in totals.items())
            + " (redirected = messages handed from socket to socket without TCP/IP)."]


def main(argv: list[str]) -> int:
    doc = json.loads(Path(argv[0]).read_text())
    print(render(doc, []))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
