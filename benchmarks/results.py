"""results.json: raw runs, medians per point, ratios, and the machine they ran on.

Pure functions over the run records of `benchmarks.runner` (except
`machine()`, which asks the host). `benchmarks.report` and
`benchmarks.plots` read only what `summarize()` returns.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

FIGURES = ("p50_us", "p90_us", "p99_us", "rps", "cpu_s_per_1k", "sidecar_rss_mb")
BASELINES = ("sidecar", "no-mesh")


def point_key(run: dict[str, Any]) -> tuple[str, int, float | None]:
    return run["scenario"], int(run["connections"]), run.get("offered_rps")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each figure over the repeats of one (point, configuration), plus ratios.

    Ratios are configuration / baseline of the medians measured in this same
    invocation: `p50_vs_sidecar` < 1 means lower latency than the sidecar mesh,
    `rps_vs_sidecar` > 1 means more throughput.
    """
    groups: dict[tuple[tuple[str, int, float | None], str], list[dict[str, Any]]] = {}
    for run in runs:
        if "error" in run:
            continue
        groups.setdefault((point_key(run), run["configuration"]), []).append(run)
    rows: list[dict[str, Any]] = []
    for (point, name), group in groups.items():
        row: dict[str, Any] = {"scenario": point[0], "connections": point[1],
                               "offered_rps": point[2], "configuration": name,
                               "repeats": len(group)}
        for fig in FIGURES:
            row[fig] = statistics.median(r[fig] for r in group)
        # the spread over repeats, so a reader sees how much a shared machine moved the median
        row["p50_min_us"] = min(r["p50_us"] for r in group)
        row["p50_max_us"] = max(r["p50_us"] for r in group)
        shares = [r["kernel_share"] for r in group if r.get("kernel_share") is not None]
        row["kernel_share"] = statistics.median(shares) if shares else None
        row["errors"] = sum(r.get("errors", 0) for r in group)
        rows.append(row)
    index = {(point_key(r), r["configuration"]): r for r in rows}
    for row in rows:
        for base in BASELINES:
            ref = index.get((point_key(row), base))
            for fig in ("p50_us", "p99_us", "rps", "cpu_s_per_1k"):
                ratio = None
                if ref and ref[fig]:
                    ratio = round(row[fig] / ref[fig], 3)
                row[f"{fig.removesuffix('_us')}_vs_{base}"] = ratio
    return rows


def _cmd_first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine(envoy: str) -> dict[str, Any]:
    """Details of the host a run was measured on (a shared machine: load average too)."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu_model": cpu_model,
        "kernel": platform.release(), "os": platform.platform(),
        "python": platform.python_version(),
        "envoy": _cmd_first_line([envoy, "--version"]).replace(f"{envoy}  ", ""),
        "wrk": _cmd_first_line(["wrk", "-v"]).split(" [")[0],
        "h2load": _cmd_first_line(["h2load", "--version"]),
        "loadavg_start": os.getloadavg(),
    }


def document(outcome: Any, plan: Any, mach: dict[str, Any], started: float) -> dict[str, Any]:
    """The whole results.json document."""
    mach = {**mach, "loadavg_end": os.getloadavg()}
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "interrupted": outcome.interrupted,
        "machine": mach,
        "plan": {"quick": plan.quick, "repeats": plan.repeats, "duration_s": plan.duration_s,
                 "warmup_s": plan.warmup_s,
                 "points": [c.label for c in plan.cells]},
        "configurations": outcome.configurations,
        "runs": outcome.runs,
        "summary": summarize(outcome.runs),
    }


def write(doc: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
