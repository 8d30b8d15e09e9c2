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
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.bpf_cost import _lib, read_programs

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "kernel_differential"  # the test's mesh and its helpers
KINDS = (("rewrite_allow", "/old/x"), ("rewrite_deny", "/deny/x"), ("plain", "/plain"))


def _one(m: Any, d: Path, mine: set[int], kind: str, path: str, n: int,
         driver: Path) -> dict[str, Any]:
    reqs = [{"vip": "web", "port": 9000, "path": path, "method": "GET", "body": "",
             "headers": {"host": "web:9000"}, "conn": "k"} for _ in range(n)]
    f = d / f"{kind}.json"
    f.write_text(json.dumps(reqs))
    fd = _lib().bpf_enable_stats(0)
    if fd < 0:
        raise SystemExit("BPF_ENABLE_STATS refused: root needed")
    try:
        a = read_programs("dp_")
        r = m.exec("client", [sys.executable, str(driver), str(f)], capture_output=True,
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
    from mesh.ready import wait_ready
    from mesh.runner import Mesh

    sys.path.insert(0, str(HERE))
    from onoff_mesh import prepare
    from test_rewrite_mesh import APP, DRIVER, SRC

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="rwincost-"))
    d.chmod(0o755)
    before = set(read_programs("dp_"))
    prepare(SRC, d, "mesh.yaml", "istio", APP)
    m = Mesh(d / "mesh.yaml", f"rwincost{os.getpid() % 10000}", fastpath="on", timeout=120)
    try:
        st = m.up()
        wait_ready(st["admin"], pools=1, timeout=90.0)
        mine = set(read_programs("dp_")) - before  # this mesh's programs only
        for rnd in range(args.rounds):
            for kind, path in KINDS:
                print(rnd, kind, json.dumps(_one(m, d, mine, kind, path, args.requests, DRIVER)),
                      flush=True)
        dbg = json.loads(urllib.request.urlopen(f"http://{st['admin']}/debug/fastpath",
                                                timeout=5).read())
        client = next(n for n in dbg["nodes"] if n["pod"].startswith("client"))
        print("client counters:", json.dumps([(c["route"].rsplit(".", 1)[-1], c["outcome"],
                                               c["reason"], c["requests"])
                                              for c in client["counters"]]))
    finally:
        m.down()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
