"""`l7fp demo`: start the demo mesh, drive traffic, show a live table, tear down.

Registered in xds_server/cli.py SUBCOMMANDS (`make demo` runs it). Starts
compose/demo/mesh.yaml with `mesh.runner.Mesh` (control plane `l7fp serve`
as the mesh daemon's child), runs `mesh.apps.loadgen` inside the frontend pod
so every request crosses the sidecars, and every two seconds prints two tables:
per route (client side: requests, status codes, median and p99 latency) and
per service (its inbound sidecars' Envoy stats). Bounded by --duration; the
mesh is torn down at the end, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_FILE = REPO / "compose" / "demo" / "mesh.yaml"
TARGETS = [
    "home=http://frontend:8080/home",
    "compose=http://frontend:8080/compose",
    "profile=http://frontend:8080/profile",
    "static(path)=http://frontend:8080/static/logo.png",
    "user(x-canary)=http://user:9000/user|x-canary:true",
    "unique-id(rl)=http://unique-id:9000/id",
    "admin(rbac)=http://post-storage:9000/admin",
]
DEMO_HELP = """\
Start the demo mesh (compose/demo/mesh.yaml: 11 services, 12 pods with Envoy
sidecars, needs root), send --rate requests/s to each of its routes from inside
the frontend pod for --duration seconds, and every two seconds print two tables:
per route (requests, status codes, p50/p99 latency as the client saw them) and
per service (its inbound sidecars' Envoy stats). The mesh is torn down at the
end, on Ctrl-C and on errors. `make demo` runs it with the defaults.
"""
QUANT = re.compile(r"P(\d+(?:\.\d+)?)\(([^,]+),([^)]+)\)")


def register(subparsers: argparse._SubParsersAction) -> None:
    from xds_server.argtypes import number_in

    p = subparsers.add_parser("demo", help="run the demo mesh with traffic and a live table",
                              description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default=str(DEMO_FILE), help="mesh file (default: the bundled demo)")
    p.add_argument("--name", default="demo",
                   help="mesh name (default: demo; give your own where others run meshes)")
    # the bounds of mesh.apps.loadgen, checked here: it runs only once the mesh is up
    p.add_argument("--duration", type=number_in(0, 3600), default=20.0,
                   help="seconds of traffic, at most 3600 (default 20)")
    p.add_argument("--rate", type=number_in(0, 5000), default=20.0,
                   help="requests/s per route, at most 5000 (default 20)")
    p.add_argument("--xds", choices=["ads", "file"], default="ads",
                   help="ads: the control plane `l7fp serve` feeds the sidecars (default); "
                        "file: Envoy watches generated files, no control plane")
    p.add_argument("--fastpath", choices=["on", "off", "auto"], default="off",
                   help="the kernel fast path (needs --xds ads; default off: sidecars only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mesh.runner import Mesh, MeshBusy, MeshError, find_pod, pod_popen
    from mesh.spec import MeshFileError
    try:
        m = Mesh(args.mesh, args.name, xds=args.xds, fastpath=args.fastpath)
        t0 = time.monotonic()
        state = m.up(say=lambda line: print(line, flush=True), claimed=lambda: print(
            f"starting mesh {m.name} from {args.mesh} ...", flush=True))
    except MeshBusy as exc:  # `make demo` always says `demo`: maybe another user's mesh
        print(f"l7fp demo: {busy_message(exc.name, exc.what)}", file=sys.stderr)
        return 1
    except (MeshFileError, MeshError) as exc:
        print(f"l7fp demo: {exc}", file=sys.stderr)
        return 1
    print(f"mesh up in {time.monotonic() - t0:.1f}s: {len(state['pods'])} pods", flush=True)
    gen = None

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)  # `timeout`, CI: tear down as on Ctrl-C
    signal.signal(signal.SIGINT, stop)
    try:
        argv = [sys.executable, "-m", "mesh.apps.loadgen", "--rate", str(args.rate),
                "--duration", str(args.duration)]
        for t in TARGETS:
            argv += ["--target", t]
        gen = pod_popen(find_pod(state, "frontend"), argv, stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        last_shown, routes = 0.0, {}
        for line in gen.stdout:
            doc = json.loads(line)
            routes = doc["routes"]
            if doc["final"] or time.monotonic() - last_shown >= 2.0:
                show(routes, service_rows(state), sys.stdout.isatty())
                last_shown = time.monotonic()
        gen.wait(10)
        ok = bool(routes) and sum(int(r["n"]) for r in routes.values()) > 0
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        return 130
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait(5)
        print(f"tearing down mesh {m.name} ...", flush=True)
        m.down()
        print("done", flush=True)


def busy_message(name: str, what: str) -> str:
    """Why the demo cannot start mesh `name` (a live process runs or starts one of
    that name: mesh.claim) and what to do, in one line. `make demo` always says
    `demo`, so on a shared machine another user's demo mesh is this one's name."""
    return (f"a mesh named {name!r} {what}: take it down with `l7fp mesh down --name {name}` "
            "(if it is yours), or give this demo another name: `l7fp demo --name NAME` "
            "(`make demo DEMO_NAME=NAME`)")


def service_rows(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per service, from its inbound sidecars: requests by class, p50/p99 (ms)."""
    from mesh.runner import sidecar_admin

    out: dict[str, dict[str, Any]] = {}
    for pod in state["pods"]:
        row = out.setdefault(pod["service"], {"n": 0, "2xx": 0, "4xx": 0, "5xx": 0,
                                              "p50": None, "p99": None})
        try:
            text = sidecar_admin(pod, "/stats?filter=%5Ehttp%5C.inbound_", timeout=2)
        except OSError:
            continue
        for line in text.splitlines():
            key, _, val = line.partition(": ")
            for cls in ("2xx", "4xx", "5xx"):
                if key.endswith(f".downstream_rq_{cls}") and val.isdigit():
                    row[cls] += int(val)
                    row["n"] += int(val)
            if key.endswith(".downstream_rq_time"):
                q = {p: c for p, _i, c in QUANT.findall(val)}
                for name, p in (("p50", "50"), ("p99", "99")):
                    if q.get(p, "nan") != "nan":
                        row[name] = max(row[name] or 0.0, float(q[p]))
    return out


def show(routes: dict[str, dict[str, Any]], services: dict[str, dict[str, Any]], tty: bool) -> None:
    lines = [] if not tty else ["\x1b[H\x1b[2J"]
    lines.append(f"{'ROUTE (client in frontend pod)':<32} {'REQS':>6}  {'CODES':<28} {'P50 ms':>8} {'P99 ms':>8}")
    for name, r in routes.items():
        codes = " ".join(f"{k}:{v}" for k, v in r["codes"].items())
        lines.append(f"{name:<32} {r['n']:>6}  {codes:<28} {_f(r['p50_ms']):>8} {_f(r['p99_ms']):>8}")
    lines.append("")
    lines.append(f"{'SERVICE (inbound sidecars)':<32} {'REQS':>6}  {'2xx':>6} {'4xx':>6} {'5xx':>6}"
                 f"        {'P50 ms':>8} {'P99 ms':>8}")
    for name, s in services.items():
        lines.append(f"{name:<32} {s['n']:>6}  {s['2xx']:>6} {s['4xx']:>6} {s['5xx']:>6}"
                     f"        {_f(s['p50']):>8} {_f(s['p99']):>8}")
    print("\n".join(lines) + "\n", flush=True)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
