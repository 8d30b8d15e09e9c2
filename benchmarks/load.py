"""Load generators: wrk (closed loop, HTTP/1.1) and h2load (rate-limited sweep, HTTP/2 or /1.1).

Called by `benchmarks.runner`; each function runs one bounded measurement in a
given pod (network namespace + cgroup) and returns a `LoadResult`. Parsing is
pure (`parse_wrk`, `parse_h2load_log`) so it is unit-tested on real outputs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LUA = Path(__file__).with_name("wrk_report.lua")
CDF_POINTS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 97.5,
              98, 99, 99.5, 99.9, 99.99)


@dataclass
class LoadResult:
    """One measurement: latency percentiles in µs, throughput, errors, CDF points."""

    requests: int
    duration_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    errors: int
    cdf: list[tuple[float, float]] = field(default_factory=list)
    offered_rps: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


class LoadError(RuntimeError):
    """The load generator failed or produced nothing usable."""


def in_pod(netns: str | None, cgroup: Path | None, argv: Sequence[str],
           timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv inside netns (if given) with the process placed in cgroup (if given)."""
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)

    def join_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=join_cgroup, env=full_env, check=False,
                          start_new_session=True)  # Ctrl-C is the harness's to handle


def run_wrk(url: str, connections: int, duration_s: float, *, netns: str | None = None,
            cgroup: Path | None = None, paths: Sequence[str] = ()) -> LoadResult:
    """Closed loop: `connections` connections, each sending the next request on the reply."""
    threads = max(1, min(connections, 2))
    secs = max(1, math.ceil(duration_s))
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{secs}s",
            "--timeout", "5s", "-s", str(LUA), url]
    env = {"L7FP_BENCH_PATHS": ",".join(paths)}
    proc = in_pod(netns, cgroup, argv, timeout=secs + 30, env=env)
    if proc.returncode != 0:
        raise LoadError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk(proc.stdout)


def parse_wrk(stdout: str) -> LoadResult:
    """Read the `L7FP-JSON` line that wrk_report.lua's done() prints."""
    for line in stdout.splitlines():
        if line.startswith("L7FP-JSON "):
            data = json.loads(line[len("L7FP-JSON "):])
            break
    else:
        raise LoadError(f"wrk printed no L7FP-JSON summary: {stdout.strip()[-300:]!r}")
    cdf = [(float(p), float(v)) for p, v in data["cdf"]]
    by_p = dict(cdf)
    errors = sum(int(v) for v in data["errors"].values())
    if data["requests"] == 0:
        raise LoadError(f"wrk completed no request (errors {data['errors']})")
    return LoadResult(requests=int(data["requests"]), duration_s=data["duration_us"] / 1e6,
                      p50_us=by_p[50], p90_us=by_p[90], p99_us=by_p[99], errors=errors, cdf=cdf)


def run_h2load(url: str, connections: int, duration_s: float, rate: float | None, *,
               netns: str | None = None, cgroup: Path | None = None, h1: bool = True,
               warmup_s: float = 0.5) -> LoadResult:
    """Rate-limited load: `rate` requests/s in total spread over the connections.

    h2load paces each client (`--rps`), so a connection is not pushed faster
    than the offered rate; latency is per request from its start (no
    coordinated-omission correction, stated in docs/benchmarks.md).
    """
    secs = max(1, math.ceil(duration_s))
    with tempfile.TemporaryDirectory(prefix="l7fp-bench-") as tmp:
        log = Path(tmp) / "h2load.log"
        argv = ["h2load", "-c", str(connections), "-t", "1", "-D", str(secs),
                "--warm-up-time", f"{max(1, round(warmup_s * 1000))}ms", "--log-file", str(log)]
        if h1:
            argv.append("--h1")
        if rate is not None:
            argv += ["--rps", f"{max(rate / connections, 0.1):.3f}"]
        proc = in_pod(netns, cgroup, [*argv, url], timeout=secs + warmup_s + 30)
        if proc.returncode != 0:
            raise LoadError(f"h2load exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        text = log.read_text() if log.exists() else ""
    result = parse_h2load_log(text, secs)
    result.offered_rps = rate
    return result


def parse_h2load_log(text: str, duration_s: float) -> LoadResult:
    """h2load --log-file: `start_us<TAB>status<TAB>elapsed_us` per request."""
    lat: list[int] = []
    errors = 0
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) < 3:
            continue
        status, elapsed = int(cols[1]), int(cols[2])
        if not 200 <= status < 400:
            errors += 1
        lat.append(elapsed)
    if not lat:
        raise LoadError("h2load logged no request")
    lat.sort()
    cdf = [(p, float(percentile(lat, p))) for p in CDF_POINTS]
    return LoadResult(requests=len(lat), duration_s=duration_s, p50_us=percentile(lat, 50),
                      p90_us=percentile(lat, 90), p99_us=percentile(lat, 99), errors=errors, cdf=cdf)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])
