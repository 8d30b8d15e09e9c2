"""Path rewrites to a destination with a sidecar, fast path off vs on (NAME=rwin).

A local mesh with istiod-generated config (rewrite/mesh.yaml,
rewrite/istio/policies.yaml): the client calls `web`, whose VirtualService
rewrites paths (`rewrite.uri`: Envoy's prefix_rewrite; `uriRegexRewrite`:
regex_rewrite in the kernel's forms) and whose AuthorizationPolicy denies
`/blocked*` and `/old/*`. With the fast path off the client's sidecar
rewrites and adds `x-envoy-original-path`, web's sidecar decides on the new
path. With it on the client's kernel rewrites and decides web's inbound
policy on the new path (dp_msg_rwin + dp_msg_in): a decision on the old path
would answer /old/x (-> /new/x) with 403 and let /deny/x (-> /blocked/x) in.
Per request: same status and body, and web's app got the same request line
and headers (x-envoy-original-path included); with it on, the kernel served
them (counters), except those Envoy must take: a rewritten path the inbound
sidecar may normalize (`/dot/x` -> `/new//x`; `/dd./x` -> `/new/../x`, which
web's sidecar turns into `/x`), and a forwarded request that carries its own
x-envoy-original-path (Envoy overwrites it).

Run: .venv/bin/python -m pytest tests/kernel_differential/test_rewrite_mesh.py -q   (root)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from onoff_mesh import prepare, run_driver
from support.onoff import both_modes

from fastpath.request_id import normalized
from mesh.ready import wait_ready

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow,
              pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
SRC = HERE / "rewrite"
APP = "../../kernel_mirror/mirror_app.py"  # logs each request: line, headers, body
DRIVER = HERE.parent / "kernel_retry" / "driver1w.py"  # head and body in one write
GAP_MS = 50  # fast path on: lets the agent refill the pool between connections
ORIG = "x-envoy-original-path"

# (path, extra request headers, status with either path)
CASES: list[tuple[str, dict[str, str], int]] = [
    ("/old/x", {}, 200),  # -> /new/x (the old path is denied)
    ("/old/a/b?q=1&r=/s", {}, 200),  # the query is kept
    ("/deny/x", {}, 403),  # -> /blocked/x (the old path is allowed)
    ("/deny/y?z", {}, 403),
    ("/exact", {}, 200),  # -> /new/exact
    ("/exact?k=v", {}, 200),
    ("/hub/fine", {}, 200),  # -> /fine
    ("/hub/blocked", {}, 403),  # -> /blocked
    ("/hub/old/a?b", {}, 403),  # -> /old/a?b
    ("/all/x?q", {}, 403),  # -> /blocked-all?q
    ("/plain", {}, 200),  # no rewrite
    ("/blocked", {}, 403),  # no rewrite, denied
    ("/dot/x", {}, 200),  # -> /new//x: Envoy's (kernel: path_rewrite)
    ("/dd./x", {}, 200),  # -> /new/../x, which web's sidecar makes /x: Envoy's
    ("/dd", {}, 200),  # -> /new/. (web's sidecar: /new/): Envoy's
    # a client's x-envoy-* header: Envoy's, which acts on, strips or overwrites
    # them (here it overwrites it; tests/split/test_stripped_headers_envoy.py)
    ("/deny/h", {ORIG: "/sent"}, 403),
    ("/old/h", {ORIG: "/sent"}, 200),
]
KERNEL_PUNTS = {"envoy/path_rewrite": 3,  # /dot/x, /dd./x, /dd
                "envoy/header_conflict": 2}  # /deny/h, /old/h


def gen_requests() -> list[dict[str, Any]]:
    return [{"vip": "web", "port": 9000, "path": path, "method": "GET", "body": "",
             "headers": {"host": "web:9000", "x-rw-id": f"r{n}", **extra}}
            for n, (path, extra, _) in enumerate(CASES)]


def read_log(logdir: Path, pod: str) -> dict[str, dict[str, Any]]:
    """x-rw-id -> the request `pod`'s app got."""
    f = logdir / f"{pod}.jsonl"
    rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
    return {dict(r["headers"]).get("x-rw-id", "-"): r for r in rows}


def run_mesh(tmp: Path, mode: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    d = tmp / mode
    logdir = prepare(SRC, d, "mesh.yaml", "istio", APP)
    run = run_driver(d, f"rwin{mode}", mode, DRIVER, reqs, GAP_MS,
                     lambda admin: wait_ready(admin, pools=1, every_node=True, timeout=90.0))
    client_ip = next(p["ip"] for p in run["st"]["pods"] if p["name"].startswith("client"))
    return {**run, "got": read_log(logdir, "web-0"), "client_ip": client_ip}


def view(r: dict[str, Any] | None, client_ip: str) -> tuple[Any, ...] | None:
    """What web's app got: request line and every header in order (the client
    pod's address as CLIENT; a fresh UUID v4 x-request-id as "<uuid4>": the
    client's sidecar or the kernel path added it, bpf_src/dp_xrid.h)."""
    if r is None:
        return None
    hdrs = tuple((k, normalized(k, v.replace(client_ip, "CLIENT"))) for k, v in r["headers"])
    return (r["method"], r["path"], hdrs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from support.env import require_kernel

    require_kernel()
    tmp = tmp_path_factory.mktemp("rwin")
    tmp.chmod(0o755)
    reqs = gen_requests()
    return {"reqs": reqs, **both_modes(lambda mode: run_mesh(tmp, mode, reqs))}


def test_same_answers_and_requests_as_envoy(runs: dict[str, Any], kernel: None) -> None:
    off, on = runs["off"], runs["on"]
    bad = []
    for n, (path, _, status) in enumerate(CASES):
        a, b = off["results"][n], on["results"][n]
        assert a["status"] == status, ("off", path, a)
        assert (b["status"], b["body"]) == (a["status"], a["body"]), (path, a, b)
        rid = f"r{n}"
        got = (view(on["got"].get(rid), on["client_ip"]),
               view(off["got"].get(rid), off["client_ip"]))
        if got[0] != got[1]:
            bad.append((path, got))
        if status == 200:
            assert dict(off["got"][rid]["headers"]).get(ORIG) == (
                path if path != "/plain" else None), (path, off["got"][rid])
    assert not bad, bad


def test_kernel_served_the_rewrites(runs: dict[str, Any], kernel: None) -> None:
    counts = runs["on"]["counts"]
    print("fast path counters:", dict(counts))
    assert {k: counts[k] for k in KERNEL_PUNTS} == KERNEL_PUNTS, dict(counts)
    served = counts["fast"] + counts["kernel_reply"]
    assert served == len(CASES) - sum(KERNEL_PUNTS.values()), dict(counts)
    client = next(n for n in runs["on"]["dbg"]["nodes"] if n["pod"].startswith("client"))
    assert "-DDP_REWRITE=1" in client["cflags"] and "-DDP_INBOUND=1" in client["cflags"]
