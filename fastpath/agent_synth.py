"""KernelPlan -> the plan tables of K1's l7fp_decide, written into a node datapath.

Owner: K2 (this glue; the synthesis itself is K1's `fastpath.synth`). Called by
`fastpath.agent_node` in "l7fp" decision mode. Writes generation `gen` only:
the caller flips `dp_cfg.gen` afterwards. The data path's own tables (dp_svc:
destination -> listener id + 1; dp_eps: (gen, cluster id, endpoint index) ->
upstream pool; dp_ep_in: the same key -> the destination pod's inbound
listener id + 1, when fastpath.inbound_merge merged it) are filled here too, with the same endpoint order the
synthesis counts (healthy endpoints, or all when fewer than half are healthy,
as Envoy's panic threshold).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath import rewrite_kernel
from fastpath.inbound_merge import is_merged_cluster, merged_name
from fastpath.loader import drop_generation
from fastpath.plan import Direction, KernelPlan, ListenerPlan, Verdict
from fastpath.pools import EndpointKey

WILDCARD = ("0.0.0.0", "::", "")


@dataclass
class Programmed:
    services: dict[tuple[str, int], int] = field(default_factory=dict)
    route_names: dict[int, str] = field(default_factory=dict)
    keep: set[EndpointKey] = field(default_factory=set)
    pool_clusters: dict[int, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    timeouts: dict[int, int] = field(default_factory=dict)  # dp route id -> ms
    per_try: dict[int, int] = field(default_factory=dict)  # dp route id -> per-try timeout ms


def endpoint_order(cluster: Any) -> list[Any]:
    """The endpoints l7fp_decide indexes (fastpath.synth_tables._cluster's rule)."""
    healthy = [e for e in cluster.endpoints if e.healthy]
    return healthy if cluster.endpoints and len(healthy) * 2 >= len(cluster.endpoints) \
        else list(cluster.endpoints)


def offloadable(lst: ListenerPlan) -> bool:
    """Worth tracking: an outbound listener with at least one kernel route.

    The listener's RBAC filters are evaluated by l7fp_decide (the synthesis
    hands the whole listener to Envoy when one of them needs Envoy), with the
    client pod's address as the source (sockops.c sets it)."""
    if lst.direction is not Direction.OUTBOUND or lst.verdict is not Verdict.KERNEL:
        return False
    return any(r.verdict is Verdict.KERNEL for vh in lst.virtual_hosts for r in vh.routes)


def listener_destinations(listeners: tuple[ListenerPlan, ...],
                          vips: Callable[[ListenerPlan], list[tuple[str, int]]]
                          ) -> dict[tuple[str, int], str]:
    """Destination (ip, port) -> name of the offloadable outbound listener whose
    routes apply to it. Envoy gives a connection to VIP:P to a listener bound to
    VIP:P before the wildcard 0.0.0.0_P (Istio makes both for some services), so
    such a VIP never takes the wildcard's routes, offloaded or not. Pure."""
    own = {(lst.address, lst.port) for lst in listeners
           if lst.direction is Direction.OUTBOUND and lst.address not in WILDCARD}
    out: dict[tuple[str, int], str] = {}
    for lst in listeners:
        if not offloadable(lst):
            continue
        for dst in vips(lst):
            if lst.address not in WILDCARD or dst not in own:
                out[dst] = lst.name
    return out


def write_tables(bpf: Any, sp: Any, gen: int) -> None:
    """sp.tables(gen) into the module's l7fp_* maps (inactive generation only)."""
    names = bpf["l7fp_hnames"]
    for k in [k for k in names.keys() if k.pad == gen]:
        del names[k]
    for name, entries in sp.tables(gen).items():
        t = bpf[name]
        if name == "l7fp_buckets" and sp.knobs.get("L7FP_N_BUCKETS"):
            entries = keep_bucket_state(t, entries, sp.knobs["L7FP_N_BUCKETS"])
        for k, v in entries.items():
            t[t.Key.from_buffer_copy(k)] = t.Leaf.from_buffer_copy(v)


# struct l7fp_bucket: configuration (max_tokens .. pad), then state (tokens, last_ns)
_BUCKET_CFG = 40


def keep_bucket_state(table: Any, entries: dict[bytes, bytes], n: int) -> dict[bytes, bytes]:
    """Token buckets of the new generation take the live state (tokens, last
    fill) of the active generation's bucket at the same index when its
    configuration is the same. Without this every re-apply of a plan (the agent
    re-applies all plans when the mesh state file changes) handed out a full
    bucket again: the kernel admitted 7 of 12 requests through a 5-token,
    1-hour limit (tests/kernel_differential). The order of a plan's buckets is
    the synthesis's, so an unchanged plan maps each bucket onto itself."""
    out = dict(entries)
    for k, v in entries.items():
        idx = int.from_bytes(k[:4], "little")
        other = (idx + n) % (2 * n)  # same bucket, the other generation
        try:
            live = bytes(table[table.Key(other)])
        except KeyError:
            continue
        if live[:_BUCKET_CFG] == v[:_BUCKET_CFG] and len(live) == len(v):
            out[k] = v[:_BUCKET_CFG] + live[_BUCKET_CFG:]
    return out


def program(node: Any, plan: KernelPlan, sp: Any, gen: int,
            vips: Callable[[ListenerPlan], list[tuple[str, int]]],
            netns_of: Callable[[str], str | None], inbound_ok: Callable[[str, int], bool],
            cgroup_of: Callable[[str], str | None]) -> Programmed:
    out = Programmed()
    write_tables(node.dp.bpf, sp, gen)
    rewrite_kernel.write(node.dp.bpf, sp, gen)
    eps, eps_in = node.dp.bpf["dp_eps"], node.dp.bpf["dp_ep_in"]
    for t in (eps, eps_in):
        drop_generation(t, gen)
    cluster_pools: dict[int, list[int]] = {}
    ep_pools: dict[tuple[int, int], int] = {}  # (cluster id, endpoint index) -> pool
    for c in plan.clusters:
        cid = sp.cluster_ids.get(c.name)
        if cid is None or c.verdict is not Verdict.KERNEL or c.tls or is_merged_cluster(c.name):
            continue
        for idx, e in enumerate(endpoint_order(c)):
            if not inbound_ok(e.address, e.port):
                continue  # no pool: the kernel hands these requests to Envoy (rule 4)
            lid_in = sp.listener_ids.get(merged_name(e.address, e.port))
            if lid_in is not None:  # the destination's inbound listener decides too
                eps_in[eps_in.Key(gen=gen, cluster=cid, endpoint=idx)] = eps_in.Leaf(lid_in + 1)
            ns, cg = netns_of(e.address), cgroup_of(e.address)
            if ns and cg:
                node.dp.attach_cgroup(cg, role="server")  # pairs the app's ends
            key = EndpointKey("127.0.0.1" if ns else e.address, e.port, ns)
            pool = node.pools.ensure(key)
            out.keep.add(key)
            out.pool_clusters[pool] = c.name
            eps[eps.Key(gen=gen, cluster=cid, endpoint=idx)] = eps.Leaf(pool)
            cluster_pools.setdefault(cid, []).append(pool)
            ep_pools[(cid, idx)] = pool
    node.retrier.program(plan, sp, gen, cluster_pools)
    node.outlier.program(plan, sp, gen, endpoint_order, ep_pools)
    node.mirrorer.program(plan, sp, gen)
    node.delayer.program(sp, gen)
    node.redirector.program(sp, gen)
    for dst, name in listener_destinations(plan.listeners, vips).items():
        out.services[dst] = sp.listener_ids[name] + 1
    for lst in plan.listeners:
        if lst.direction is Direction.OUTBOUND and not offloadable(lst):
            out.notes[lst.name] = "no kernel route (or RBAC/verdict of the listener)"
    out.route_names = {i + 1: n for i, n in enumerate(sp.route_names)}
    out.timeouts = {i + 1: ms for i, ms in getattr(sp, "route_timeouts", {}).items()}
    out.per_try = node.retrier.per_try(gen)
    for n in sp.notes:
        out.notes.setdefault(f"note{len(out.notes)}", n)
    return out
