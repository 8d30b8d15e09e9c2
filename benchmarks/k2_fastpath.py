"""Side-by-side latency/throughput of the kernel fast path in the local mesh (K2).

Run: .venv/bin/python -m benchmarks.k2_fastpath [--seconds 5] [--rounds 3] [--decide l7fp]

One mesh, two pods with Envoy sidecars (client, leaf: benchmarks.apps leaf).
wrk runs in the client pod against the leaf's service name, at 1 and 16
connections, in ABC order per round:

* fastpath: the agent (`fastpath.agent`, this process) attached to the client
  pod, with a plan whose one route forwards every request to the leaf;
* envoy: the same pod with the agent detached (client sidecar + leaf sidecar);
* direct: wrk as the sidecar's uid 1337, which the interception skips: the
  client reaches the leaf pod without any proxy (the no-mesh baseline).

Prints one JSON line per measurement and a summary of medians over rounds,
plus the kernel's share of requests from the agent's counters. Owner: K2.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MESH = """
name: k2bench
services:
  client:
    command: ["${PYTHON}", -m, benchmarks.apps, leaf, --port, "8080"]
    ports: [8080]
  leaf:
    command: ["${PYTHON}", -m, benchmarks.apps, leaf, --port, "9000"]
    ports: [9000]
"""


def parse(out: str) -> dict[str, Any]:
    """p50 (µs) and req/s from `wrk --latency` output."""
    units = {"us": 1.0, "ms": 1000.0, "s": 1e6}
    m = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    r = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m or not r:
        raise RuntimeError(f"wrk output not understood:\n{out[-1500:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return {"p50_us": float(m.group(1)) * units[m.group(2)], "rps": float(r.group(1)),
            "errors": errors}


def share(before: dict[Any, int], after: dict[Any, int]) -> dict[str, Any]:
    """Requests the data path saw between two counter reads: served by the kernel,
    and the ones it handed to Envoy because the pool was empty or the connection
    had gone there before (sticky)."""
    d = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    kernel = sum(n for (_r, o, _w), n in d.items() if o in ("fast", "kernel_reply"))
    why: dict[str, int] = {}
    for (_r, o, w), n in d.items():
        if o == "envoy":
            why[w] = why.get(w, 0) + n
    return {"kernel": kernel, "seen": sum(d.values()), "envoy_by_reason": why}


def plan_for(state: dict[str, Any], inbound: bool = False,
             timeout_ms: int = 0, retry: bool = False, mirror_pct: float = 0.0,
             outlier: bool = False) -> tuple[Any, Any]:
    """(client plan, leaf plan). `inbound`: the leaf's plan gets an inbound
    listener with an RBAC deny of /admin and a header add, so every fast-path
    request also takes the second (inbound) decision (fastpath.inbound_merge).
    `timeout_ms`: the leaf route's timeout (every request is then timed:
    fastpath/timeouts.py); no header add, to measure the timer alone.
    `retry`: the leaf route has Istio's default retry policy (every request is
    kept for a retry and every response head checked: bpf_src/dp_retry.h).
    `mirror_pct`: that share of the leaf route's requests is mirrored to the
    leaf cluster (copied by the kernel, sent again by the agent: dp_mirror.h).
    `outlier`: the leaf cluster has outlier detection (each request picked
    through dp_outlier_pick, each response status counted: dp_outlier.h)."""
    from fastpath.outlier import OutlierConfig
    from fastpath.plan import (
        Cluster,
        ClusterAction,
        Direction,
        Endpoint,
        KernelPlan,
        LbPolicy,
        ListenerPlan,
        MirrorPolicy,
        PathKind,
        RetryPolicy,
        Route,
        RouteMatch,
        Verdict,
        VirtualHost,
        WeightedCluster,
    )
    pods = {p["service"]: p for p in state["pods"]}
    leaf = pods["leaf"]
    istio_retry = RetryPolicy(num_retries=2, retry_on=("cancelled", "connect-failure",
                                                       "refused-stream", "retriable-status-codes",
                                                       "unavailable"),
                              status_codes=(503,), grpc_codes=(1, 14), previous_hosts=True,
                              host_selection_attempts=5)
    mirrors = (MirrorPolicy("leaf", round(mirror_pct * 10_000)),) if mirror_pct else ()
    vh = VirtualHost("leaf", ("*",), (Route("leaf", RouteMatch(PathKind.PREFIX, "/"),
                                            ClusterAction((WeightedCluster("leaf", 1),),
                                                          timeout_ms=timeout_ms or None,
                                                          retry=istio_retry if retry else None,
                                                          mirrors=mirrors),
                                            Verdict.KERNEL),))
    client = KernelPlan(pods["client"]["node_id"], "bench",
                        (ListenerPlan("out9000", "0.0.0.0", 9000, Direction.OUTBOUND, (vh,)),),
                        (Cluster("leaf", LbPolicy.ROUND_ROBIN, (Endpoint(leaf["ip"], 9000),),
                                 outlier=OutlierConfig(max_percent=100) if outlier else None),))
    app = Cluster("inbound|9000||", LbPolicy.ROUND_ROBIN, (Endpoint("127.0.0.1", 9000),))
    return client, KernelPlan(leaf["node_id"], "bench", _leaf_inbound() if inbound else (),
                              (app,) if inbound else ())


def _leaf_inbound() -> tuple[Any, ...]:
    from fastpath.plan import (
        ClusterAction,
        Direction,
        HeaderValue,
        ListenerPlan,
        PathKind,
        Permission,
        Principal,
        Rbac,
        RbacPolicy,
        Route,
        RouteMatch,
        StringKind,
        StringMatch,
        Verdict,
        VirtualHost,
        WeightedCluster,
    )
    deny = Rbac("DENY", (RbacPolicy("no-admin", ((Permission(path=StringMatch(
        StringKind.PREFIX, "/admin")),),), ((Principal(any=True),),)),))
    vh = VirtualHost("inbound|http|9000", ("*",), (Route(
        "in", RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster("inbound|9000||", 1),)),
        Verdict.KERNEL, request_headers_to_add=(HeaderValue("x-in", "1"),)),))
    return (ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND, (vh,),
                         rbac=deny, rbacs=(deny,)),)


def wrk(m: Any, conns: int, seconds: float, as_sidecar: bool = False,
        close: bool = False, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    """`close`: one new connection per request (`Connection: close`; wrk reconnects).
    `headers`: extra request header lines ("Name: value") on every request."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
            *(["-H", "Connection: close"] if close else []),
            *(a for h in headers for a in ("-H", h)), "http://leaf:9000/x"]
    if as_sidecar:
        argv = ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups", *argv]
    r = m.exec("client", argv, capture_output=True, text=True, timeout=seconds + 30)
    return parse(r.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="ABC rounds (default 3)")
    p.add_argument("--inbound-policy", action="store_true",
                   help="the leaf has inbound RBAC + a header add: the kernel decides twice")
    p.add_argument("--decide", choices=["l7fp", "inline"], default="l7fp",
                   help="decision compiled into the data path (default l7fp)")
    p.add_argument("--route-timeout-ms", type=int, default=0,
                   help="a timeout on the leaf route (0: none): the cost of the route timer")
    p.add_argument("--mesh-name", default="k2bench",
                   help="name of the benchmark's mesh (two runs at once need two names)")
    p.add_argument("--retry-policy", action="store_true",
                   help="Istio's default retry policy on the leaf route: the cost of keeping "
                   "every request and checking every response for a retry")
    p.add_argument("--mirror-percent", type=float, default=0.0,
                   help="mirror this share of the leaf route's requests to the leaf (0: none): "
                   "the cost of the kernel's copy and the agent's shadows")
    p.add_argument("--outlier", action="store_true",
                   help="outlier detection on the leaf cluster: the cost of the pick's lookups "
                   "and of counting every response status")
    p.add_argument("--close", action="store_true",
                   help="one new connection per request (wrk -H 'Connection: close')")
    p.add_argument("--header", action="append", default=[],
                   help="an extra request header line on every request, e.g. "
                   "'Connection: keep-alive' (the cost of removing hop-by-hop headers)")
    args = p.parse_args(argv)
    from fastpath.agent import Agent
    from mesh import ready
    from mesh.runner import Mesh

    work = Path(tempfile.mkdtemp(prefix="k2bench"))
    (work / "mesh.yaml").write_text(MESH)
    m = Mesh(work / "mesh.yaml", args.mesh_name, fastpath="off", timeout=120)
    m.up()
    agent = Agent(m.state_file, access_log=False, decide=args.decide)
    agent.start()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        client, leaf = plan_for(m.state(), args.inbound_policy, args.route_timeout_ms,
                                args.retry_policy, args.mirror_percent, args.outlier)
        agent.on_plan(leaf.node_id, leaf)
        agent.on_plan(client.node_id, client)
        deadline = time.monotonic() + 60
        while why := ready.not_ready(agent.debug(), "client"):  # plan applied, pools warm
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not load: {why}: {agent.debug()}")
            time.sleep(0.2)
        node = agent.nodes[client.node_id]
        for rnd in range(args.rounds):
            for conns in (1, 16):
                for config in ("fastpath", "envoy", "direct"):
                    if config == "fastpath":
                        node.dp.attach_cgroup(node.pod.cgroup)
                    else:
                        node.dp.detach_cgroup(node.pod.cgroup)
                    before = node.stats()
                    res = wrk(m, conns, args.seconds, as_sidecar=config == "direct",
                              close=args.close, headers=tuple(args.header))
                    if config == "fastpath":
                        res.update(share(before, node.stats()))
                        res["pool_targets"] = [p["target"] for p in node.pools.snapshot()]
                    results.setdefault((config, conns), []).append(res)
                    print(json.dumps({"round": rnd, "config": config, "connections": conns,
                                      **res}), flush=True)
        node.dp.attach_cgroup(node.pod.cgroup)
        stats = node.stats()
        fired = dict(node.keeper.counts) if node.keeper is not None else {}
        mirrors = node.mirrorer.debug()
        outlier_on = "-DDP_OUTLIER=1" in node.cflags  # compiled in (--outlier)
    finally:
        agent.stop()
        m.down()
    total = sum(stats.values())
    fast = sum(n for (_r, outcome, _why), n in stats.items() if outcome in ("fast",
                                                                            "kernel_reply"))
    summary: dict[str, Any] = {f"{c}@{n}": {"p50_us": statistics.median(x["p50_us"] for x in v),
                            "rps": statistics.median(x["rps"] for x in v)}
               for (c, n), v in sorted(results.items())}
    summary["kernel_share"] = {"kernel": fast, "seen": total,
                               "by_outcome": {f"{o}/{w}": n for (_r, o, w), n in stats.items()}}
    summary["route_timeout_ms"] = args.route_timeout_ms
    summary["timeouts_fired"] = fired
    summary["retry_policy"] = args.retry_policy
    summary["mirror_percent"] = args.mirror_percent
    summary["mirrors"] = mirrors
    summary["outlier_compiled_in"] = outlier_on
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
