"""Bounded HTTP load for the demo: fixed-rate requests to named targets.

Run by `l7fp demo` inside a pod (so its requests go through the sidecar):

    python -m mesh.apps.loadgen --target home=http://frontend:8080/home --rate 50 --duration 20

Each target gets `--rate` requests per second (open loop, at most
`--concurrency` in flight per target) until `--duration` seconds have passed.
Every second it prints one JSON line with cumulative per-target results:
requests, status codes (0 = transport error), median and p99 latency (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

from aiohttp import ClientSession, ClientTimeout, TCPConnector


class Target:
    """Results of one named URL."""

    def __init__(self, name: str, url: str, headers: dict[str, str]) -> None:
        self.name, self.url, self.headers = name, url, headers
        self.codes: Counter[int] = Counter()
        self.lat_ms: list[float] = []
        self.inflight = 0

    def summary(self) -> dict[str, object]:
        lat = sorted(self.lat_ms)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
        return {"url": self.url, "n": sum(self.codes.values()),
                "codes": {str(k): v for k, v in sorted(self.codes.items())},
                "p50_ms": q(0.5), "p99_ms": q(0.99)}


async def one(session: ClientSession, t: Target) -> None:
    t.inflight += 1
    t0 = time.perf_counter()
    try:
        async with session.get(t.url, headers=t.headers) as r:
            await r.read()
            code = r.status
    except Exception:  # a transport error is a result (code 0), not a crash
        code = 0
    finally:
        t.inflight -= 1
    t.codes[code] += 1
    t.lat_ms.append((time.perf_counter() - t0) * 1000)


async def drive(t: Target, session: ClientSession, rate: float, end: float, conc: int) -> None:
    gap = 1.0 / rate
    nxt = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    while nxt < end:
        if t.inflight < conc:
            task = asyncio.create_task(one(session, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        nxt += gap
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def run(targets: list[Target], rate: float, duration: float, conc: int) -> None:
    end = time.monotonic() + duration
    async with ClientSession(connector=TCPConnector(limit=0),
                             timeout=ClientTimeout(total=5)) as session:
        drivers = [asyncio.create_task(drive(t, session, rate, end, conc)) for t in targets]
        while not all(d.done() for d in drivers):
            await asyncio.wait(drivers, timeout=1.0)
            report(targets)
    report(targets, final=True)


def report(targets: list[Target], final: bool = False) -> None:
    line = {"t": round(time.time(), 3), "final": final, "routes": {t.name: t.summary() for t in targets}}
    print(json.dumps(line), flush=True)


def parse_target(item: str) -> tuple[str, str, dict[str, str]]:
    """NAME=URL[|HEADER:VALUE...]"""
    name, sep, rest = item.partition("=")
    if not sep or not rest.startswith("http://"):
        raise SystemExit(f"--target {item!r}: expected NAME=http://HOST:PORT/PATH[|HEADER:VALUE]")
    url, *hdrs = rest.split("|")
    return name, url, dict(h.split(":", 1) for h in hdrs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.apps.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, metavar="NAME=URL[|H:V]")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s per target (default 20)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    p.add_argument("--concurrency", type=int, default=32, help="max in flight per target")
    args = p.parse_args(argv)
    if not 0 < args.rate <= 5000 or not 0 < args.duration <= 3600:
        raise SystemExit("--rate must be in (0, 5000] and --duration in (0, 3600]")
    targets = [Target(*parse_target(t)) for t in args.target]
    asyncio.run(run(targets, args.rate, args.duration, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
