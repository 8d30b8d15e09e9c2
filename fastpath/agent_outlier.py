"""Outlier detection on kernel routes: the agent half (time and bookkeeping).

Owner: NAME=outlier. One `OutlierKeeper` per node (`agent_node.NodeDatapath`):
`program` is called by `agent_synth.program` for each plan generation,
`service` by the node's `upkeep` on the agent's event thread, `debug` and
`counts` by /debug/fastpath and /metrics. The kernel half is
bpf_src/dp_outlier.h (consecutive errors, the ejection itself, the LB's skip,
panic); Envoy's rules are in fastpath/outlier.py (`Detector`).

Ownership (DESIGN.md rule 3): the kernel ejects (at once, so the next request
already skips the host) and counts `ejected` up (below `allowed`); the agent
unejects at the interval ticks (counters zeroed, `ejected` down)
and sets thresholds, totals and panic. The LB view (`lb_out` of each host)
is published to the node's Envoy as EDS UNHEALTHY (`lb_view`, `on_lb_change`:
the agent has the server republish the node), so the requests the kernel
hands to Envoy skip the same hosts; the responses Envoy gets come back over
its access log (`count_envoy` queues them on the server's loop; `service`
counts them on the event thread, never while a plan is applied) in the same
host records: one detector for both paths. Only the clusters of the applied
plan (`owned`) are counted and published; a detector of a cluster that left
the plan stays (its state comes back with the cluster) but is not exported.

The agent never writes a host (dp_odh) or detector (dp_odd) record itself:
every change it makes (a status the kernel did not see, an unejection, the
merge rule's decision and the LB view's delivery, the thresholds and the
detector's settings) is an op run by dp_od_ops (BPF_PROG_TEST_RUN,
`_run_ops`), which applies it in place with the response path's own code
(dp_outlier_status, dp_od_merge) and atomics, so a kernel ejection, count or
merge mark in between is never undone. It only reads records.
"""

from __future__ import annotations

import ctypes as ct
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpath import bpfsys
from fastpath.outlier import Detector, OutlierConfig, allowed_ejections, envoy_events
from fastpath.plan import KernelPlan, LbPolicy, Verdict
from fastpath.residual_outlier import owned_clusters

log = logging.getLogger(__name__)

DP_OD_CLUSTERS = 256  # bpf_src/dp_outlier.h defaults
DP_OD_EPS = 16
DP_OD_HOSTS = 1024
DP_OD_DETS = 256
DP_OD_BATCH = 64  # ops per BPF_PROG_TEST_RUN (dp_outlier.h)
OP_STATUS, OP_UNEJECT, OP_DELIVER, OP_CFG = 1, 2, 3, 4  # DP_OD_OP_* (dp_outlier.h)
OP_DET, OP_CHANGE, OP_DUE, OP_LEAVE, OP_LOCAL = 5, 6, 7, 8, 9
LOOK_EVERY_NS = 10_000_000  # kernel ejections noticed, merged updates delivered within 10 ms
PUBLISH_EVERY_NS = 20_000_000  # LB view changes to Envoy's EDS: at most one push per 20 ms


class OdCluster(ct.Structure):
    """struct dp_od_cluster (dp_outlier.h)."""

    _fields_ = [("det", ct.c_uint32), ("n", ct.c_uint32), ("rr", ct.c_uint32),
                ("ctr", ct.c_uint32), ("reply", ct.c_uint32), ("_pad", ct.c_uint32),
                ("host", ct.c_uint16 * DP_OD_EPS)]


class OdDet(ct.Structure):
    """struct dp_od_det (dp_outlier.h)."""

    _fields_ = [("ejected", ct.c_uint64), ("lb_out", ct.c_uint64), ("allowed", ct.c_uint32),
                ("total", ct.c_uint32), ("panic", ct.c_uint32), ("pending", ct.c_uint32),
                ("window_ns", ct.c_uint64), ("last_ns", ct.c_uint64), ("due_ns", ct.c_uint64)]


class OdHost(ct.Structure):
    """struct dp_od_host (dp_outlier.h)."""

    _fields_ = [("c5xx", ct.c_uint32), ("cgw", ct.c_uint32), ("t5xx", ct.c_uint32),
                ("tgw", ct.c_uint32), ("ejected", ct.c_uint64), ("lb_out", ct.c_uint64),
                ("ej_ns", ct.c_uint64), ("det", ct.c_uint32), ("ejections", ct.c_uint32),
                ("overflow", ct.c_uint32), ("kind", ct.c_uint32), ("clo", ct.c_uint32),
                ("tlo", ct.c_uint32)]


class OdOp(ct.Structure):
    """struct dp_od_op (dp_outlier.h): one change of a host or detector record."""

    _fields_ = [("op", ct.c_uint16), ("slot", ct.c_uint16), ("det", ct.c_uint16),
                ("c", ct.c_uint16), ("a", ct.c_uint32), ("b", ct.c_uint32), ("ns", ct.c_uint64)]


def needs_outlier(plan: KernelPlan) -> bool:
    """-DDP_OUTLIER=1 for this plan: a kernel cluster has outlier detection."""
    return any(c.outlier is not None and c.verdict is Verdict.KERNEL for c in plan.clusters)


def host_key(e: Any) -> str:
    return f"{e.address}:{e.port}"


@dataclass
class _Det:
    """One cluster's detector: its id in dp_odd and host slots in dp_odh."""

    det_id: int
    detector: Detector
    slots: dict[str, int] = field(default_factory=dict)  # host key -> dp_odh slot
    next_tick_ns: int = 0
    ejections: int = 0  # noticed kernel ejections
    unejections: int = 0

    def live_slots(self) -> Iterator[tuple[str, int]]:
        """(host key, slot) of the hosts the cluster has now (slots are kept
        for hosts a plan dropped, so that one coming back keeps its state)."""
        return ((k, s) for k, s in self.slots.items() if k in self.detector.hosts)


class OutlierKeeper:
    """The agent's half for one node's datapath `dp` (fastpath.loader.Datapath)."""

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.dets: dict[str, _Det] = {}  # cluster name -> detector
        self._free_slot = 0
        self.looked_ns = 0
        self._lock = threading.Lock()  # count_error runs on the timer thread too
        # (gen, cluster id, pool) -> (detector, host slot): the retry agent's view
        self.pool_host: dict[tuple[int, int, int], tuple[_Det, int]] = {}
        # the LB view last handed to Envoy's EDS (replaced, never changed: read by
        # the server's loop) and who republishes it (set by the agent)
        self.lb_view: dict[str, frozenset[str]] = {}
        self.on_lb_change: Any = None
        self.published_ns = 0
        self.publishes = 0
        self.envoy_counted = 0  # responses of Envoy's path counted (count_envoy)
        # Envoy's observations, queued by the server's loop, counted by service()
        self.inbox: queue.SimpleQueue[list[tuple[str, str, int]]] = queue.SimpleQueue()
        # clusters whose detector the applied plan gives the kernel on both paths
        # (residual_outlier.owned_clusters), and their CLA names (replaced,
        # never changed: read by the server's loop)
        self.owned: frozenset[str] = frozenset()
        self.cla_names: dict[str, str] = {}
        self.eds_lag_ms: list[float] = []  # last 16: kernel ejection -> LB view pushed (node)
        self._ops_fd: int | None = None  # dp_od_ops, loaded at the first op
        # host slots of clusters with split_external_local_origin_errors (kept
        # by program(); read by count_error on the timer thread)
        self.split_slots: set[int] = set()

    # ---- plan (plans thread, node busy) ----------------------------------
    def program(self, plan: KernelPlan, sp: Any, gen: int, order: Any,
                ep_pools: dict[tuple[int, int], int]) -> None:
        """Write generation `gen`'s cluster records; `order(cluster)` gives the
        endpoints in l7fp_decide's index order (agent_synth.endpoint_order),
        `ep_pools` (cluster id, endpoint index) -> upstream pool (for retries)."""
        if not self._has("dp_odc"):
            return  # a datapath without dp_outlier.h (unit fakes): nothing to do
        self.pool_host = {k: v for k, v in self.pool_host.items() if k[0] != gen}
        both_paths = owned_clusters(plan)
        owned, cla = set(), {}
        odc = self.dp.bpf["dp_odc"]
        for cid in range(DP_OD_CLUSTERS):  # this generation's records: rewritten below
            odc[ct.c_uint32(gen * DP_OD_CLUSTERS + cid)] = OdCluster()
        for c in plan.clusters:
            cid = sp.cluster_ids.get(c.name)
            if c.outlier is None or c.verdict is not Verdict.KERNEL or cid is None \
                    or cid >= DP_OD_CLUSTERS:
                continue
            eps = order(c)[:DP_OD_EPS]
            d = self._det(c.name, c.outlier, [host_key(e) for e in eps])
            if c.name in both_paths:
                owned.add(c.name)
                cla[c.name] = c.eds_name or c.name
            rec = OdCluster(det=d.det_id + 1, n=len(eps), rr=int(c.lb_policy is LbPolicy.ROUND_ROBIN))
            reply = getattr(sp, "no_healthy", {}).get(c.name)
            rec.reply = 0 if reply is None else reply + 1  # healthy_panic_threshold 0
            for i, e in enumerate(eps):
                rec.host[i] = d.slots[host_key(e)]
                if (cid, i) in ep_pools:
                    self.pool_host[(gen, cid, ep_pools[(cid, i)])] = (d, d.slots[host_key(e)])
            odc[ct.c_uint32(gen * DP_OD_CLUSTERS + cid)] = rec
        self.owned, self.cla_names = frozenset(owned), cla

    def _has(self, name: str) -> bool:
        try:
            self.dp.bpf[name]
        except KeyError:
            return False
        return True

    def _det(self, name: str, cfg: OutlierConfig, hosts: list[str]) -> _Det:
        d = self.dets.get(name)
        if d is None:
            d = _Det(len(self.dets), Detector(cfg))
            d.next_tick_ns = time.monotonic_ns() + cfg.interval_ms * 1_000_000
            self.dets[name] = d
        gone = [d.slots[k] for k in d.detector.hosts if k not in hosts]
        d.detector.cfg = cfg
        d.detector.set_hosts(hosts)
        for h in hosts:
            if h not in d.slots:
                d.slots[h] = self._free_slot
                self._free_slot += 1
        ops = [OdOp(OP_LEAVE, slot) for slot in gone]  # out of both views (Envoy forgets it)
        ops += [OdOp(OP_CFG, d.slots[h], d.det_id, min(cfg.threshold_local, 0xffff),
                     cfg.threshold_5xx, cfg.threshold_gateway) for h in hosts]
        self.split_slots.difference_update(gone + [d.slots[h] for h in hosts])
        if cfg.split:
            self.split_slots.update(d.slots[h] for h in hosts)
        self._run_ops(ops + [self._det_op(d)])
        return d

    @staticmethod
    def _det_op(d: _Det) -> OdOp:
        """The detector's settings (the agent's fields of dp_odd, in place)."""
        cfg = d.detector.cfg
        n = len(d.detector.hosts)
        return OdOp(OP_DET, 0, d.det_id, int(round(cfg.panic_percent)), allowed_ejections(cfg, n),
                    n, cfg.merge_window_ms * 1_000_000)

    def _run_ops(self, ops: list[OdOp]) -> None:
        """Apply `ops` to dp_odh in the kernel (dp_od_ops), DP_OD_BATCH per run."""
        if not ops:
            return
        fd = self._ops_fd
        if fd is None:
            from bcc import BPF

            fd = self._ops_fd = self.dp.bpf.load_func("dp_od_ops", BPF.XDP).fd
        if len(ops) > DP_OD_BATCH and any(o.op in (OP_CHANGE, OP_DUE) for o in ops):
            raise ValueError(f"{len(ops)} ops with a CHANGE/DUE: its DELIVERs must share its run")
        for i in range(0, len(ops), DP_OD_BATCH):
            chunk = ops[i:i + DP_OD_BATCH]
            bpfsys.prog_test_run(fd, (OdOp * len(chunk))(*chunk))

    def _deliver(self, d: _Det, op: int, now: int, before: list[OdOp] | None = None) -> None:
        """`op` (OP_CHANGE: unejections under the merge rule; OP_DUE: a merged
        update whose window ended) decides in the kernel, against the record
        as it is then, whether every host's state goes to the LB's view now:
        one run, so the DELIVER ops see that decision (`before`: the
        unejections, applied first)."""
        ops = [*(before or []), OdOp(op, 0, d.det_id, 0, 0, 0, now)]
        self._run_ops(ops + [OdOp(OP_DELIVER, slot) for _k, slot in d.live_slots()])

    # ---- the retry agent (agent event thread) ------------------------------
    def healthy_pools(self, gen: int, cid: int, pools: list[int]) -> list[int]:
        """`pools` of cluster `cid` whose host is not ejected (all of them in
        panic, or when the cluster has no outlier detection)."""
        hosts = {p: self.pool_host.get((gen, cid, p)) for p in pools}
        if not any(hosts.values()):
            return pools
        odh = self.dp.bpf["dp_odh"]
        ok = [p for p, h in hosts.items() if h is None or not odh[ct.c_uint32(h[1])].lb_out]
        det = next(h[0] for h in hosts.values() if h is not None)
        dv = self.dp.bpf["dp_odd"][ct.c_uint32(det.det_id)]
        healthy = max(0, int(dv.total) - int(dv.lb_out))  # the LB's view, as the pick
        if not healthy or healthy * 100 < int(dv.panic) * int(dv.total):
            return pools  # panic: Envoy's LB takes every host
        return ok or pools

    def od_host(self, gen: int, cid: int, pool: int) -> int:
        """dp_peer's od_host for an attempt on a pooled upstream of `pool`:
        its host slot + 1, 0 when its cluster has no outlier detection."""
        got = self.pool_host.get((gen, cid, pool))
        return got[1] + 1 if got else 0

    def attempt(self, gen: int, cid: int, pool: int) -> int:
        """The retry agent sends an attempt on a pooled upstream of `pool`:
        its dp_peer `od_host` (`od_host`), and for a split cluster the
        attempt's connection counts (Envoy's LocalOriginConnectSuccess, as
        sk_msg's dp_outlier_sent)."""
        host1 = self.od_host(gen, cid, pool)
        if host1 and host1 - 1 in self.split_slots:
            with self._lock:
                self._run_ops([OdOp(OP_LOCAL, host1 - 1, 0, 0, 0)])
        return host1

    def mark(self, up: int, gen: int, cid: int, pool: int) -> None:
        """The retry agent sends an attempt on U's existing binding (pool `pool`):
        its response counts for that host (dp_peer's od_host, as sk_msg sets it)."""
        t = self.dp.bpf["dp_peer"]
        v = bpfsys.table_get(t, up)
        if v is None:
            return
        v.od_host = self.attempt(gen, cid, pool)
        t[t.Key(up)] = v

    # ---- errors the agent answers (event thread: resets; timer thread: timeouts)
    def count_error(self, up: int, status: int, sidecar: bool = True) -> None:
        """The agent answered the request on U itself: a close before any
        response byte (503) or a route / per-try timeout (504, Envoy's
        LocalOriginTimeout). Counted for U's host as Envoy's detector counts
        it: without split as that status (dp_outlier_status); with split a
        timeout is a local-origin failure, and so is a close unless the
        destination has a `sidecar` (a pod's: it answers its app's close 503,
        a status the client's detector counts as such). Call before U's
        dp_peer entry goes."""
        v = bpfsys.table_get(self.dp.bpf["dp_peer"], up)
        host1 = int(v.od_host) if v is not None else 0
        if not host1:
            return
        local = host1 - 1 in self.split_slots and (status == 504 or not sidecar)
        op = OdOp(OP_LOCAL, host1 - 1, 0, 0, 1) if local else OdOp(OP_STATUS, host1 - 1, 0, 0, status)
        with self._lock:
            self._run_ops([op])

    def count_envoy(self, obs: list[tuple[str, str, int]]) -> None:
        """Responses the node's Envoy got, (cluster, "ip:port", status) each
        (fastpath.als, on the server's loop): queued; `service` counts them."""
        self.inbox.put(obs)

    def _count_envoy(self) -> None:
        """Count the queued observations for their hosts as Envoy's detector
        of their cluster counts them (outlier.envoy_events: a status as the
        kernel counts a response, dp_outlier_status; with split, the local-
        origin events), so one detector sees both paths. Clusters or hosts
        the applied plan does not own are ignored."""
        ops, n = [], 0
        while True:
            try:
                obs = self.inbox.get_nowait()
            except queue.Empty:
                break
            for cluster, host, code in obs:
                d = self.dets.get(cluster) if cluster in self.owned else None
                slot = d.slots.get(host) if d is not None and host in d.detector.hosts else None
                if d is None or slot is None:
                    continue
                n += 1
                ops += [OdOp(OP_STATUS if kind == "status" else OP_LOCAL, slot, 0, 0, v)
                        for kind, v in envoy_events(code, d.detector.cfg)]
        self._run_ops(ops)
        self.envoy_counted += n

    # ---- upkeep (agent event thread) -------------------------------------
    def service(self, now_ns: int | None = None) -> None:
        """Count Envoy's queued responses; notice the kernel's ejections; at
        each detector's interval tick, bring back the hosts whose ejection
        time is over. Event thread, node not busy (no plan being applied)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            self._count_envoy()
            if not self.dets or now - self.looked_ns < LOOK_EVERY_NS:
                return
            self.looked_ns = now
            self._service(now)

    def _service(self, now: int) -> None:
        odh = self.dp.bpf["dp_odh"]
        for d in self.dets.values():
            for key, slot in d.live_slots():
                h = odh[ct.c_uint32(slot)]
                if h.ejected and d.detector.hosts[key].ejected_ns is None:
                    d.detector.noticed(key, int(h.ej_ns))
                    d.ejections += 1
            while now >= d.next_tick_ns:
                self._tick(d, now)
                d.next_tick_ns += d.detector.cfg.interval_ms * 1_000_000
            rec = self.dp.bpf["dp_odd"][ct.c_uint32(d.det_id)]
            if rec.pending and now >= rec.due_ns:
                self._deliver(d, OP_DUE, now)  # the merge window ended
        self._publish(now)

    def _publish(self, now: int) -> None:
        """Hand a changed LB view (hosts with `lb_out`, per cluster) to Envoy's
        EDS, at most once per PUBLISH_EVERY_NS (a change meanwhile waits for
        the next look). Envoy skips those hosts as the kernel's pick does."""
        if self.on_lb_change is None or now - self.published_ns < PUBLISH_EVERY_NS:
            return
        odh = self.dp.bpf["dp_odh"]
        view = {name: frozenset(k for k, slot in d.live_slots() if odh[ct.c_uint32(slot)].lb_out)
                for name, d in self.dets.items() if name in self.owned}
        if view == self.lb_view:
            return
        for name, d in self.dets.items():  # kernel ejection -> this push, per host newly out
            for key in view.get(name, frozenset()) - self.lb_view.get(name, frozenset()):
                ej = int(odh[ct.c_uint32(d.slots[key])].ej_ns)
                self.eds_lag_ms = [*self.eds_lag_ms[-15:], round((now - ej) / 1e6, 1)]
        self.lb_view, self.published_ns = view, now
        self.publishes += 1
        try:
            self.on_lb_change()
        except Exception:  # Envoy keeps its previous view; the next change retries
            log.exception("outlier: publishing the LB view")

    def _tick(self, d: _Det, now: int) -> None:
        back = d.detector.tick(now)
        if not back:
            return
        d.unejections += len(back)
        self._deliver(d, OP_CHANGE, now, [OdOp(OP_UNEJECT, d.slots[key]) for key in back])

    # ---- views --------------------------------------------------------------
    def debug(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, d in self.dets.items():
            if name not in self.owned:
                continue
            hosts = {}
            for key, slot in d.live_slots():
                h = self.dp.bpf["dp_odh"][ct.c_uint32(slot)]
                st = d.detector.hosts[key]
                hosts[key] = {"ejected": bool(h.ejected), "consecutive_5xx": int(h.c5xx),
                              "consecutive_gateway": int(h.cgw),
                              "consecutive_local_origin": int(h.clo), "ejections": st.ejections,
                              "multiplier": st.multiplier, "overflow": int(h.overflow)}
            out[name] = {"ejections": d.ejections, "unejections": d.unejections,
                         "active": d.detector.ejected(), "room": d.detector.room(),
                         "eds_unhealthy": sorted(self.lb_view.get(name, ())),
                         "eds_publishes": self.publishes, "eds_lag_ms": self.eds_lag_ms,
                         "envoy_counted": self.envoy_counted,
                         "hosts": hosts}
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Per cluster: ejections (total) and active ejections (Prometheus)."""
        return {name: {"ejections": d.ejections, "active": d.detector.ejected()}
                for name, d in self.dets.items() if name in self.owned}


class OutlierCollector:
    """prometheus_client collector of every node's detectors (registered by
    fastpath.agent.start next to FastpathCollector). `source()` returns
    (node id, OutlierKeeper.counts()) pairs."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        total = CounterMetricFamily(
            "l7fp_fastpath_outlier_ejections", "Hosts the kernel ejected (outlier detection "
            "on kernel routes), per cluster", labels=["node", "cluster"])
        active = GaugeMetricFamily(
            "l7fp_fastpath_outlier_ejections_active", "Hosts ejected now by the kernel's "
            "outlier detection, per cluster", labels=["node", "cluster"])
        for node, counts in self.source():
            for cluster, c in sorted(counts.items()):
                total.add_metric([node, cluster], c["ejections"])
                active.add_metric([node, cluster], c["active"])
        yield total
        yield active

    def describe(self) -> list[Any]:
        return []
