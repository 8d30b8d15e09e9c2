"""When a mesh's fast path is ready for a kernel probe.

Callers: the kernel/mesh tests that send requests the kernel must serve
(tests/kernel_differential, kernel_mirror, kernel_retry, kernel_datapath's
and tests/mesh's fast-path mesh tests, tests/istio) and the benchmarks
(benchmarks.meshconfig's probe, rewrite_cost, k2_fastpath). Pure reads of the
control plane's `/debug/fastpath` (fastpath.agent.Agent.debug): nothing here
owns a process or a mesh.

Ready means: every pod in the mesh state has its plan at the agent (a
destination's plan arriving later re-applies, or rebuilds, its clients'
nodes; a rebuilt node's connections go to Envoy), the client's node runs a
plan and has none left to apply or recheck (`plans_due`), and it has at least
`free` free pooled upstreams in its pools (a connection whose first request
finds its pool empty goes to Envoy for its life). A node's plan can go live
with empty pools: its apply waits at most 2 s for them
(fastpath.pools.wait_filled). With `every_node`, every other node too has
loaded with its plan (nothing due at all): for a load that goes through
several pods' kernels (the benchmarks' multi-hop meshes). docs/test-harness.md,
"Readiness before a kernel probe", has what was measured.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any


class NotReady(AssertionError):
    """The fast path was not ready by the deadline (an AssertionError: a test
    that waited for it fails there, with what was missing: `why`)."""

    def __init__(self, why: str, dbg: dict[str, Any]) -> None:
        super().__init__(f"{why}; /debug/fastpath: {json.dumps(dbg)[:4000]}")
        self.why = why


def fastpath_debug(admin: str) -> dict[str, Any]:
    """The control plane's /debug/fastpath ({} while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{admin}/debug/fastpath", timeout=5) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def client_node(dbg: dict[str, Any], client: str) -> dict[str, Any] | None:
    """The loaded node of the first pod whose name starts with `client`."""
    return next((n for n in dbg.get("nodes", []) if n["pod"].startswith(client)), None)


def not_ready(dbg: dict[str, Any], client: str, free: int = 1,
              pools: int | None = None, every_node: bool = False) -> str:
    """What keeps the fast path from serving `client`'s requests ("" when
    nothing): see the module docstring. `pools`: how many of the client's
    pools must hold `free` free upstreams (None: all of them, at least one)."""
    if not dbg:
        return "no /debug/fastpath answer"
    if dbg.get("nodes_failed"):
        return f"nodes failed: {dbg['nodes_failed']}"
    no_plan = sorted(set(dbg.get("pods_known", [])) - set(dbg.get("plans_known", [])))
    if not dbg.get("pods_known") or no_plan:
        return f"pods without a plan at the agent: {no_plan or 'no pod known yet'}"
    node = client_node(dbg, client)
    due = dbg.get("plans_due", [])
    if every_node and due:
        return f"plans still to apply or recheck: {due}"
    if node is None:
        return f"no node loaded for pod {client}"
    if node["node"] in due or not node.get("plan_version"):
        return f"{node['pod']}: its plan is still to apply or recheck"
    have = [p for p in node["pools"] if p["free"] >= free]
    want = len(node["pools"]) if pools is None else pools
    if not node["pools"] or len(have) < want:
        return (f"{node['pod']}: {len(have)} of {want} pools with {free}+ free upstreams ("
                + pools_text(node) + ")")
    return ""


def pools_text(node: dict[str, Any]) -> str:
    """A loaded node's pools as `address:port free`, comma-separated."""
    return ", ".join(f"{p['address']}:{p['port']} {p['free']}" for p in node["pools"])


def wait_ready(admin: str, client: str = "client", free: int = 1, pools: int | None = None,
               every_node: bool = False, timeout: float = 90.0) -> dict[str, Any]:
    """Poll /debug/fastpath until `not_ready` says nothing; return that view.
    Raises NotReady at `timeout`, or at once when a node failed to load."""
    deadline = time.monotonic() + timeout
    while True:
        dbg = fastpath_debug(admin)
        why = not_ready(dbg, client, free, pools, every_node)
        if not why:
            return dbg
        late = time.monotonic() >= deadline
        if dbg.get("nodes_failed") or late:
            raise NotReady(f"the fast path is not ready for {client}"
                           + (f" after {timeout:.0f} s" if late else "") + f": {why}", dbg)
        time.sleep(0.2)
