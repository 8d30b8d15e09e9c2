"""Runs a `Plan` against the configurations side by side and records every run.

Called by `benchmarks.cli`. Owns the configurations' lifetime for one
invocation: every configuration comes up once before the first measurement
and goes down in `finally` (Ctrl-C and SIGTERM included), so no pod, Envoy,
namespace, cgroup or BPF attachment outlives the run.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from benchmarks import configs, load
from benchmarks.configs import Configuration, Unavailable
from benchmarks.plan import Cell, Plan

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Everything one invocation produced, in the shape results.json stores."""

    configurations: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def measure(cfg: Configuration, cell: Cell, duration_s: float) -> dict[str, Any]:
    """One bounded load run against `cfg`, with CPU, memory and data-path counters around it."""
    url = cfg.url(cell.scenario.pod, cell.scenario.path)
    counters0, cpu0 = cfg.counters(), cfg.cpu_usec()
    if cell.rate is None:
        res = load.run_wrk(url, cell.connections, duration_s, netns=cfg.client_netns,
                           cgroup=cfg.loadgen_cgroup, paths=cell.scenario.paths)
    else:
        res = load.run_h2load(url, cell.connections, duration_s, cell.rate,
                              netns=cfg.client_netns, cgroup=cfg.loadgen_cgroup)
    cpu1, counters1 = cfg.cpu_usec(), cfg.counters()
    delta = {k: counters1.get(k, 0) - v for k, v in counters0.items()}
    rss = cfg.sidecar_rss()
    return {
        "configuration": cfg.name, "scenario": cell.scenario.name,
        "connections": cell.connections, "load": "closed" if cell.rate is None else "rate",
        "offered_rps": cell.rate,
        "p50_us": res.p50_us, "p90_us": res.p90_us, "p99_us": res.p99_us,
        "rps": round(res.rps, 1),
        "cpu_s_per_1k": round((cpu1 - cpu0) / 1e6 / res.requests * 1000, 5),
        "kernel_share": cfg.kernel_share(delta),
        "requests": res.requests, "errors": res.errors, "duration_s": round(res.duration_s, 3),
        "sidecar_rss_mb": round(rss / 2**20, 1), "sidecars": cfg.sidecar_count(),
        "counters": delta, "cdf": res.cdf,
    }


class Progress:
    """One line per run on stderr: position, ETA, the figures just measured."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total, self.done, self.out, self.t0 = total, 0, out, time.monotonic()

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, cell: Cell, rep: int, name: str, rec: dict[str, Any] | str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        what = (rec if isinstance(rec, str) else
                f"p50 {rec['p50_us']:.0f}us p99 {rec['p99_us']:.0f}us {rec['rps']:.0f} req/s "
                f"cpu {rec['cpu_s_per_1k']:.3f}s/1k")
        self.line(f"[{self.done}/{self.total} eta {eta:.0f}s] {cell.label} rep {rep + 1} "
                  f"{name}: {what}")


# Set by Ctrl-C/SIGTERM. The KeyboardInterrupt raised with it can be swallowed
# when it lands in an interpreter hook (logging's at-fork lock release around a
# subprocess start), so the loops also check the flag between steps.
STOP = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    STOP.set()
    raise KeyboardInterrupt


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


def execute(plan: Plan, names: list[str], *, envoy: str, workdir: Path, concurrency: int,
            substrate: str = "own", progress: Progress | None = None) -> Outcome:
    """Bring the configurations up, run the plan in ABAB order, tear everything down.

    Two phases: the scenarios on the bench pods, then (full runs) the demo
    mesh's scenario, whose meshes exist only during their phase.
    """
    outcome = Outcome()
    prog = progress or Progress(0)
    prog.total = 0
    STOP.clear()
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for scope in ("pods", "demo"):
            cells = [c for c in plan.cells if c.scenario.demo == (scope == "demo")]
            if cells:
                _run_phase(scope, replace(plan, cells=cells), names, envoy, workdir,
                           concurrency, substrate, outcome, prog)
    except KeyboardInterrupt:
        STOP.set()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if STOP.is_set():
        outcome.interrupted = True
        prog.line("interrupted: the meshes were torn down")
    return outcome


def _run_phase(scope: str, plan: Plan, names: list[str], envoy: str, workdir: Path,
               concurrency: int, substrate: str, outcome: Outcome, prog: Progress) -> None:
    live: list[Configuration] = []
    try:
        _bring_up(scope, names, envoy, workdir, concurrency, substrate, outcome, prog, live)
        by_name = {c.name: c for c in live}
        order = [n for n in names if n in by_name]
        prog.total += plan.total(order)
        _warm_up(plan, live, prog)
        for cell, rep, name in plan.schedule(order):
            check_stop()
            try:
                rec = measure(by_name[name], cell, plan.duration_s)
                rec["rep"] = rep
                outcome.runs.append(rec)
                prog.run(cell, rep, name, rec)
            except (load.LoadError, OSError, RuntimeError) as exc:
                outcome.runs.append({"configuration": name, "scenario": cell.scenario.name,
                                     "connections": cell.connections, "rep": rep,
                                     "offered_rps": cell.rate, "error": str(exc)})
                prog.run(cell, rep, name, f"FAILED: {exc}")
    finally:
        for cfg in reversed(live):
            try:
                cfg.down()
            except Exception as exc:  # keep tearing the others down
                log.warning("teardown of %s: %s", cfg.name, exc)


def _bring_up(scope: str, names: list[str], envoy: str, workdir: Path, concurrency: int,
              substrate: str, outcome: Outcome, prog: Progress, live: list[Configuration]) -> None:
    """Bring each configuration up, appending it to `live` (the caller tears `live` down)."""
    if scope == "demo":
        built = configs.build_demo(names, envoy=envoy, workdir=workdir)
    else:
        built = configs.build(names, envoy=envoy, workdir=workdir, concurrency=concurrency,
                              substrate=substrate)
    where = " (demo mesh)" if scope == "demo" else ""
    for name, item in zip([n for n in configs.NAMES if n in names], built, strict=True):
        check_stop()
        entry = {"name": name, "scope": scope, "status": "ok", "reason": ""}
        outcome.configurations.append(entry)
        if isinstance(item, Unavailable):
            entry.update(status="unavailable", reason=str(item))
            prog.line(f"{name}{where}: unavailable: {item}")
            continue
        t0 = time.monotonic()
        try:
            item.up()
        except (Unavailable, RuntimeError, OSError) as exc:
            entry.update(status="failed", reason=str(exc))
            prog.line(f"{name}{where}: failed to come up: {exc}")
            continue
        live.append(item)
        check_stop()
        prog.line(f"{name}{where}: up in {time.monotonic() - t0:.1f}s")


def _warm_up(plan: Plan, live: list[Configuration], prog: Progress) -> None:
    """A short unrecorded run per configuration and scenario: pools, caches, JIT-free warm state."""
    seen: set[tuple[str, str]] = set()
    secs = plan.warmup_s or 1.0
    for cell in plan.cells:
        for cfg in live:
            key = (cfg.name, cell.scenario.name)
            if key in seen or (plan.quick and cell.scenario != plan.cells[0].scenario):
                continue
            check_stop()
            seen.add(key)
            try:
                load.run_wrk(cfg.url(cell.scenario.pod, cell.scenario.path), 4, secs,
                             netns=cfg.client_netns, cgroup=cfg.loadgen_cgroup,
                             paths=cell.scenario.paths)
            except load.LoadError as exc:
                prog.line(f"warm-up of {cfg.name} {cell.scenario.name} failed: {exc}")
    prog.line(f"warm-up done ({len(seen)} runs of {secs:.0f}s)")
