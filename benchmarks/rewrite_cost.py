"""Per-request cost of path rewrites to a destination with a sidecar.

    sudo PYTHONPATH=. .venv/bin/python -m benchmarks.rewrite_cost [--requests 2000] [--rounds 2]

Brings up the mesh of tests/kernel_differential/test_rewrite_mesh.py (client
-> web, web's VirtualService rewrites, its AuthorizationPolicy denies by path)
with the fast path on, as `rwincost<pid>`, and sends, per kind, REQUESTS GETs on
one kept-alive connection from the client pod: a rewrite web allows
(`/old/x`), a rewrite web denies (`/deny/x`), a route without rewrite
(`/plain`). Prints per kind and round: the statuses, the median client
latency, and the run count and ns per run of each BPF program loaded by this
mesh (`BPF_ENABLE_STATS` during the run only, as benchmarks.bpf_cost; a tail
call's work counts in its caller, dp_msg_verdict), then the client's
counters. Figures: docs/fastpath.md "Path rewrites". Owner: rwin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.bpf_cost import _lib, read_programs

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "kernel_differential" / "rewrite"
APP = ROOT / "tests" / "kernel_mirror" / "mirror_app.py"
DRIVER = ROOT / "tests" / "kernel_retry" / "driver1w.py"
KINDS = (("rewrite_allow", "/old/x"), ("rewrite_deny", "/deny/x"), ("plain", "/plain"))


def _mesh_dir(d: Path) -> Path:
    logs = d / "logs"
    logs.mkdir(parents=True)
    logs.chmod(0o777)
    text = (SRC / "mesh.yaml").read_text().replace("@APP@", str(APP))
    (d / "mesh.yaml").write_text(text.replace("@LOGDIR@", str(logs)))
    shutil.copytree(SRC / "istio", d / "istio")
    return d / "mesh.yaml"


def _debug(admin: str) -> dict[str, Any]:
    return json.loads(  # type: ignore[no-any-return]
        urllib.request.urlopen(f"http://{admin}/debug/fastpath", timeout=5).read())


def _wait_ready(admin: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = _debug(admin).get("nodes", [])
        if len(nodes) == 2 and all(n["plan_version"] for n in nodes):
            client = next(n for n in nodes if n["pod"].startswith("client"))
            if any(p["free"] for p in client["pools"]):
                return
        time.sleep(0.5)
    raise SystemExit("mesh not ready: no plan or no pooled upstream")


def _one(m: Any, d: Path, mine: set[int], kind: str, path: str, n: int) -> dict[str, Any]:
    reqs = [{"vip": "web", "port": 9000, "path": path, "method": "GET", "body": "",
             "headers": {"host": "web:9000"}, "conn": "k"} for _ in range(n)]
    f = d / f"{kind}.json"
    f.write_text(json.dumps(reqs))
    fd = _lib().bpf_enable_stats(0)
    if fd < 0:
        raise SystemExit("BPF_ENABLE_STATS refused: root needed")
    try:
        a = read_programs("dp_")
        r = m.exec("client", [sys.executable, str(DRIVER), str(f)], capture_output=True,
                   text=True, timeout=300)
        b = read_programs("dp_")
    finally:
        os.close(fd)
    res = json.loads(r.stdout)
    progs = {f"{name}#{pid}": (cnt - a[pid][2], round((ns - a[pid][1]) / (cnt - a[pid][2])))
             for pid, (name, ns, cnt) in b.items() if pid in mine and pid in a and cnt > a[pid][2]}
    return {"statuses": sorted({x["status"] for x in res}),
            "median_us": round(statistics.median(x["secs"] for x in res) * 1e6),
            "programs (runs, ns/run)": progs}


def main() -> None:
    from mesh.runner import Mesh

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="rwincost-"))
    d.chmod(0o755)
    before = set(read_programs("dp_"))
    m = Mesh(_mesh_dir(d), f"rwincost{os.getpid() % 10000}", fastpath="on", timeout=120)
    try:
        st = m.up()
        _wait_ready(st["admin"])
        mine = set(read_programs("dp_")) - before  # this mesh's programs only
        for rnd in range(args.rounds):
            for kind, path in KINDS:
                print(rnd, kind, json.dumps(_one(m, d, mine, kind, path, args.requests)), flush=True)
        client = next(n for n in _debug(st["admin"])["nodes"] if n["pod"].startswith("client"))
        print("client counters:", json.dumps([(c["route"].rsplit(".", 1)[-1], c["outcome"],
                                               c["reason"], c["requests"])
                                              for c in client["counters"]]))
    finally:
        m.down()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
