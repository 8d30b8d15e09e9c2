"""cgroup v2 bookkeeping for benchmark pods: where processes live, what they cost.

Owned by the benchmark harness. `benchmarks.topology` creates one directory per
pod with leaf children (`app`, `sidecar`, `loadgen`) because cgroup v2 keeps
processes in leaves only; the harness reads `cpu.stat` of the pod directory
before and after each run. Memory comes from the processes' RSS because on a
hybrid cgroup host (v1 memory controller, as here) v2 has no `memory.current`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mesh.plumbing import cgroup2_root  # one reader of /proc/mounts for every package

PREFIX = "l7fp-bench"


def bench_root() -> Path:
    """Parent directory of every cgroup this harness creates."""
    return cgroup2_root() / PREFIX


def make(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def usage_usec(path: Path) -> int:
    """CPU time (user+system, µs) charged to a cgroup and its descendants."""
    for line in (path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"{path}/cpu.stat has no usage_usec")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of the given processes (VmRSS), 0 for a gone process."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def procs(path: Path) -> list[int]:
    """Pids in a cgroup and its descendants."""
    out: list[int] = []
    for sub in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        try:
            out += [int(x) for x in (sub / "cgroup.procs").read_text().split()]
        except OSError:
            continue
    return out


def remove_tree(path: Path, timeout: float = 5.0) -> None:
    """Kill every process under `path` (cgroup.kill) and remove the directories.

    Only ever called on directories under `bench_root()`, which this harness owns.
    """
    if not path.exists():
        return
    kill = path / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, path]:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot remove cgroup {d}: processes still inside") from None
                time.sleep(0.05)
