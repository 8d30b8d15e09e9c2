"""Where the fast path's come-up time goes (docs/fastpath.md, "Bring-up time").

Root, BCC. Two measurements, wall and CPU seconds (`time.thread_time`, user +
system of the calling thread, so the verifier's work counts; on a busy
machine wall > CPU):

    python -m benchmarks.startup_cost compile [CFLAGS_JSON]
        BCC's fixed compile cost (a trivial program), the data path's compile
        with the l7fp decision and the cflags in CFLAGS_JSON (a node's
        `/debug/fastpath` "cflags"; default: none), the phases of two
        `Datapath.load`s of it (the second shares the compile), each program's
        load, and the memlock of one instance's maps.
    python -m benchmarks.startup_cost mesh [--name NAME]
        The bench's 7-pod mesh (`benchmarks.meshconfig.mesh_file`) with
        `--fastpath on`: seconds from `Mesh.up()` returning until each node is
        in `/debug/fastpath` with free pools, then every node's "startup".
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpath.loader import Timing, timed

PROGRAMS = ("dp_sockops", "dp_msg_verdict", "dp_msg_act", "dp_msg_in", "dp_skb_verdict",
            "dp_rsp_verdict", "dp_sockops_srv", "dp_srv_verdict", "dp_inj_verdict")


def print_timed(label: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, its wall and CPU seconds printed (`fastpath.loader.timed`)."""
    spent: Timing = {}
    with timed(spent, label):
        out = fn()
    wall, cpu = spent[label]
    print(f"{label}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)
    return out


def compile_cost(cflags: tuple[str, ...]) -> None:
    from bcc import BPF

    from fastpath import bpf_callback, loader
    from fastpath.bpf_instance import table_fds

    print_timed("trivial program (helpers.h, uapi/linux/bpf.h)", lambda: BPF(
        text=b"#include <uapi/linux/bpf.h>\nint f(struct __sk_buff *s) { return 0; }"))
    dps = []
    for name in ("startup-cost-1", "startup-cost-2"):
        dp = loader.Datapath.load(cflags=cflags, decide_header="dp_decide_l7fp.h", instance=name)
        print(f"Datapath.load {name}: phase -> [wall s, CPU s] {json.dumps(dp.timing)}")
        dps.append(dp)
    try:
        memlock = 0
        for fd in dps[0].bpf.fds.values():
            memlock += sum(int(ln.split()[1]) for ln in Path(f"/proc/self/fdinfo/{fd}").open()
                           if ln.startswith("memlock:"))
        print(f"one instance's maps: {len(dps[0].bpf.fds)}, memlock {memlock / 1e6:.1f} MB "
              f"(the compiled module's: {len(table_fds(dps[0].bpf.module))} maps, the same)")
        # a third instance of the same compiled code (Datapath.load's cflags), its
        # programs loaded one by one and nothing attached
        third = loader.Datapath(bpf=loader.compile_module(
            loader.module_text("dp_decide_l7fp.h"), loader.env_cflags(cflags),
            instance="startup-cost-3"))
        dps.append(third)
        kinds = {"dp_sockops": BPF.SOCK_OPS, "dp_sockops_srv": BPF.SOCK_OPS,
                 "dp_skb_verdict": BPF.SK_SKB, "dp_rsp_verdict": BPF.SK_SKB}
        for fn in PROGRAMS:
            print_timed(f"  load {fn}", functools.partial(bpf_callback.load_func, third.bpf, fn,
                                                          kinds.get(fn, BPF.SK_MSG)))
    finally:
        for dp in dps:
            dp.unload()


def mesh_cost(name: str) -> None:
    import yaml

    from benchmarks.meshconfig import mesh_file
    from mesh.runner import Mesh

    work = Path(tempfile.mkdtemp(prefix="startup-cost-"))
    spec = work / "mesh.yaml"
    spec.write_text(yaml.safe_dump(mesh_file(name), sort_keys=False))
    m = Mesh(spec, sidecars="envoy", xds="ads", fastpath="on")
    st = m.up()
    up = time.monotonic()
    try:
        ready: dict[str, float] = {}
        doc: dict[str, Any] = {}
        while len(ready) < len(st["pods"]) and time.monotonic() - up < 600:
            doc = json.loads(urllib.request.urlopen(f"http://{st['admin']}/debug/fastpath",
                                                    timeout=5).read())
            for n in doc.get("nodes", []):
                if n["pod"] not in ready and any(p["free"] for p in n["pools"]):
                    ready[n["pod"]] = round(time.monotonic() - up, 1)
            time.sleep(0.5)
        print(f"nodes loaded with free pools, s after up(): {json.dumps(ready)}; "
              f"all {len(st['pods'])}: {max(ready.values()) if len(ready) == len(st['pods']) else None}")
        for n in doc.get("nodes", []):
            print(f"  {n['pod']}: queued {n.get('startup_queued_s')} s, {json.dumps(n.get('startup'))}")
    finally:
        m.down()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compile")
    c.add_argument("cflags", nargs="?", help="JSON list of cflags (a node's /debug/fastpath cflags)")
    g = sub.add_parser("mesh")
    g.add_argument("--name", default="su-startup-cost")
    args = ap.parse_args()
    if args.what == "compile":
        compile_cost(tuple(json.loads(Path(args.cflags).read_text())) if args.cflags else ())
    else:
        mesh_cost(args.name)


if __name__ == "__main__":
    main()
