"""Differential check (not collected by pytest: two demo meshes take minutes).

Run: sudo .venv/bin/python tests/kernel_datapath/k2_demo_diff.py

Brings up compose/demo with `--fastpath on`, sends a fixed request sequence
from inside pods, tears it down, does the same with `--fastpath off`, and
prints per request (status, x-l7fp-service, server) for both, plus the fast
path's counters. `server` is the app's own header when the kernel served it.
"""
import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mesh.ready import wait_ready  # noqa: E402
from mesh.runner import Mesh  # noqa: E402

REQS = [  # (from pod, service, port, path, headers)
    ("frontend", "user", 9000, "/u1", {}), ("frontend", "user", 9000, "/u2", {"x-canary": "true"}),
        ("frontend", "static", None, "/x", {}), ("frontend", "post-storage", 9000, "/posts", {}),
        ("frontend", "social-graph", 9000, "/followers", {}), ("frontend", "user", 9000, "/admin/x", {}),
        ("home-timeline", "post-storage", 9000, "/posts", {}), ("compose-post", "unique-id", 9000, "/id", {}),
        ("frontend", "home-timeline", 9000, "/timeline", {}), ("frontend", "frontend", 8080, "/home", {}),
        # post-storage's inbound RBAC (deny /admin): a kernel 403 from its merged inbound listener
        ("home-timeline", "post-storage", 9000, "/admin/x", {})]
def run(fp):
    d = Path(tempfile.mkdtemp()) / "demo"
    shutil.copytree(Path(__file__).resolve().parents[2] / "compose" / "demo", d)
    m = Mesh(d / "mesh.yaml", f"k2d{fp}", fastpath=fp, timeout=180)
    st = m.up()
    out = []
    try:
        if fp == "on":  # every pod's datapath compiled (one after the other: seconds each)
            for src in sorted({r[0] for r in REQS}):  # and each sender's pools warm
                dbg = wait_ready(st["admin"], client=src, every_node=True, timeout=180)
            print(f"datapaths loaded: {len(dbg['nodes'])} of {len(st['pods'])} pods", flush=True)
        ports = {s["name"]: s["ports"][0] for s in st["services"]}
        for src, svc, port, path, hdrs in REQS:
            port = port or ports.get(svc)
            argv = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]
            for k, v in hdrs.items():
                argv += ["-H", f"{k}: {v}"]
            res = []
            for _ in range(3):
                r = m.exec(src, argv + [f"http://{svc}:{port}{path}"], capture_output=True, text=True, timeout=20)
                h = {ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip()
                     for ln in r.stdout.splitlines() if ":" in ln}
                code = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                res.append((code, h.get("x-l7fp-service"), h.get("server")))
            out.append((src, svc, path, res))
        if fp == "on":
            dbg = json.loads(urllib.request.urlopen(f"http://{st['admin']}/debug/fastpath").read())
            for n in dbg["nodes"]:
                print(n["pod"], n["decision"],
                      [(c["route"], c["outcome"], c["reason"], c["requests"]) for c in n["counters"]])
                print("   not offloaded:", n["not_offloaded"])
    finally:
        m.down()
    return out
on = run("on")
off = run("off")
same = 0
for a, b in zip(on, off, strict=True):
    ok = [x[:2] for x in a[3]] == [x[:2] for x in b[3]]
    same += ok
    print("SAME" if ok else "DIFF", a[0], "->", a[1], a[2], "ON", a[3], "OFF", b[3])
print(f"{same}/{len(on)} request sequences with the same status and service")
