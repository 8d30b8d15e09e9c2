"""The fast path of one node (one pod and its sidecar): datapath, pools, plan.

Owner: K2. Created and driven by `fastpath.agent` (its thread only, except
`stats()`/`debug()`, which only read). A node's programs are attached to the
pod's cgroup; its plan is applied by writing the inactive generation of the
tables and flipping `dp_cfg.gen` last, so a request sees the old plan or the
new one, never half of each. Bound upstream sockets are never re-pointed by a
plan change: a connection keeps the upstream it was given (an in-flight
request is never misrouted); new connections and new binds use the new plan.
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastpath import agent_inline, agent_synth
from fastpath.agent_close import DP_EV_CLOSE_REPLY, Closer
from fastpath.agent_delay import Delayer
from fastpath.agent_lost import Handoff
from fastpath.agent_mirror import Mirrorer
from fastpath.agent_outlier import OutlierKeeper
from fastpath.agent_redirect import Redirector
from fastpath.agent_reset import Resetter
from fastpath.agent_retry import Retrier
from fastpath.counters import (
    DP_EV_ACCESS,
    DP_EV_CLOSE,
    DP_EV_DELAY,
    DP_EV_DELAY_REPLY,
    DP_EV_REDIRECT,
    DP_EV_RETRY,
    AccessLog,
    DpEvent,
    read_stats,
)
from fastpath.loader import K_PASS, Datapath, timed
from fastpath.plan import KernelPlan, ListenerPlan
from fastpath.pools import EndpointKey, Pools
from fastpath.timeouts import TimeoutKeeper

log = logging.getLogger(__name__)

LOOK_EVERY_S = 0.005


@dataclass
class PodInfo:
    """A pod as the mesh state describes it (docs/contracts.md)."""

    name: str
    node_id: str
    cgroup: str
    netns: str | None
    ip: str
    ports: tuple[int, ...] = ()


@dataclass
class NodeDatapath:
    pod: PodInfo
    dp: Datapath
    pools: Pools
    gen: int = 0
    plan: KernelPlan | None = None
    route_names: dict[int, str] = field(default_factory=dict)
    pool_clusters: dict[int, str] = field(default_factory=dict)
    services: set[tuple[str, int]] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)
    # "ip:port" of each destination whose inbound listener the kernel decides
    # -> the version of that pod's plan merged (read by `l7fp mesh audit`)
    inbound_plans: dict[str, str] = field(default_factory=dict)
    access: AccessLog = field(default_factory=AccessLog)
    access_log: int = 1  # access-log sampling: 0 off, N one request in N
    mode: str = "inline"  # decision compiled in: "inline" (dp_decide_inline.h) or "l7fp" (K1)
    cflags: tuple[str, ...] = ()
    keeper: TimeoutKeeper | None = None  # route timeouts (l7fp mode)
    timeouts: dict[int, int] = field(default_factory=dict)  # route id -> ms, active plan
    per_try: dict[int, int] = field(default_factory=dict)  # route id -> per-try ms, active plan
    looked_at: float = 0.0
    queued_s: float = 0.0  # its plan was due this long before its start began (the agent's)
    # held while a plan is applied or the node closed (plans thread); the event
    # thread skips the node meanwhile rather than wait
    busy: threading.Lock = field(default_factory=threading.Lock)
    retrier: Retrier = field(init=False)
    mirrorer: Mirrorer = field(init=False)
    delayer: Delayer = field(init=False)
    redirector: Redirector = field(init=False)
    resetter: Resetter = field(init=False)
    closer: Closer = field(init=False)
    outlier: OutlierKeeper = field(init=False)
    handoff: Handoff = field(init=False)

    def __post_init__(self) -> None:
        self.retrier = Retrier(self.dp, self.pools)
        self.handoff = Handoff(self.dp, self.pod.netns)
        self.retrier.on_lost = self.handoff.hand  # no upstream left: Envoy answers
        self.mirrorer = Mirrorer(self.dp, self.pod.netns, self.pod.ip)
        self.delayer = Delayer(self.dp, self.pools)
        self.redirector = Redirector(self.dp)
        self.outlier = OutlierKeeper(self.dp)
        self.retrier.outlier = self.outlier
        self.resetter = Resetter(self.dp, retry=self.retrier.claim,
                                 retries_timeouts=self.retrier.retries_timeouts)
        if self.keeper is not None:  # a per-try timeout the policy retries: no 504
            self.keeper.retry = self.resetter.per_try_expired
        # outlier detection: the agent's own answers (503 of a close, 504) count too
        self.resetter.on_error = lambda up, status: self.outlier.count_error(
            up, status, sidecar=self.pools.in_pod(up))
        if self.keeper is not None:
            self.keeper.on_error = self.outlier.count_error
        # diverted responses and held requests are read, not reaped; an EOF with
        # a request waiting is answered 503 (then reaped)
        self.closer = Closer(self.dp)
        self.pools.claim = lambda up: self.retrier.claim(up) or self.delayer.claim(up)
        self.pools.claim_eof = lambda up: self.resetter.claim(up) or self.closer.claim(up)

    @classmethod
    def start(cls, pod: PodInfo, access_log: int = 1, mode: str = "inline",
              cflags: tuple[str, ...] = ()) -> NodeDatapath:
        """Load the node's datapath (mode "l7fp": with the plan's synthesized cflags)."""
        if mode == "l7fp":
            dp = Datapath.load(cflags=cflags, decide_header="dp_decide_l7fp.h",
                               instance=pod.node_id)
        else:
            dp = Datapath.load(instance=pod.node_id)
        keeper = TimeoutKeeper(dp, pod.netns)
        pools = Pools(dp)
        node = cls(pod=pod, dp=dp, pools=pools, access_log=access_log, mode=mode,
                   cflags=cflags, keeper=keeper)
        pools.start()  # the background refill thread
        try:
            with timed(dp.timing, "attach"):
                dp.set_enabled(0, enabled=False, access_log=access_log)
                dp.attach_cgroup(pod.cgroup)
                dp.open_events(node._on_event)
                dp.open_mirror_events(node._on_mirror)
                keeper.start()
                if "-DDP_DELAY=1" in cflags:
                    node.delayer.start()  # its own thread: fault delays (agent_delay.py)
        except Exception:
            node.close()
            raise
        return node

    def _apply_l7fp(self, plan: KernelPlan, sp: Any, nxt: int,
                    ctx: tuple[Any, Any, Any, Any]) -> tuple[dict[tuple[str, int], int],
                                                             set[EndpointKey], bool]:
        got = agent_synth.program(self, plan, sp, nxt, *ctx)
        self.route_names = got.route_names
        self.pool_clusters.update(got.pool_clusters)
        self.notes = got.notes
        self.dp.set_route_timeouts(nxt, got.timeouts, got.per_try)
        self.timeouts = got.timeouts
        self.per_try = got.per_try
        return got.services, got.keep, bool(got.services)

    # ---- plan -------------------------------------------------------------
    def apply(self, plan: KernelPlan, vips: Callable[[ListenerPlan], list[tuple[str, int]]],
              netns_of: Callable[[str], str | None], inbound_ok: Callable[[str, int], bool],
              cgroup_of: Callable[[str], str | None] = lambda ip: None) -> None:
        """Make `plan` the node's plan (atomic flip of the generation).

        In "l7fp" mode the caller has made sure the datapath was compiled with
        `synth.synthesize(plan).cflags` (else it rebuilds the node)."""
        nxt = 1 - self.gen
        if self.mode == "l7fp":
            from fastpath.synth import synthesize

            services, kept, enabled = self._apply_l7fp(
                plan, synthesize(plan), nxt, (vips, netns_of, inbound_ok, cgroup_of))
            self._flip(plan, nxt, services, kept, enabled)
            return
        tables = agent_inline.translate(plan, vips, inbound_ok)
        self.timeouts = {}  # the built-in decision punts routes with a timeout
        self.per_try = {}
        self.dp.clear_inline(nxt)
        keep: set[EndpointKey] = set()
        names: dict[int, str] = {}
        n_replies = 0
        for i, r in enumerate(tables.routes):
            pools = []
            for ip, port in r.endpoints:
                ns = netns_of(ip)
                cg = cgroup_of(ip)
                if ns and cg:
                    self.dp.attach_cgroup(cg, role="server")  # pairs the app's ends
                key = EndpointKey("127.0.0.1" if ns else ip, port, ns)
                pool = self.pools.ensure(key)
                keep.add(key)
                self.pool_clusters[pool] = r.cluster
                pools.append(pool)
            reply_id = nxt * 32 + n_replies  # dp_replies: 32 per generation
            if r.reply and n_replies < 32:
                self.dp.set_reply(reply_id, r.reply)
                n_replies += 1
            elif r.reply:
                r = agent_inline.InlineRoute(K_PASS, r.prefix, r.name)  # table full: punt
            self.dp.set_inline_route(nxt, i, r.kind, r.prefix, pools=tuple(pools) or (0,),
                                     reply_id=reply_id, status=r.status, route_id=i + 1)
            names[i + 1] = r.name
        for vh in tables.vhosts:
            self.dp.set_inline_vhost(nxt, vh.listener, vh.host, vh.base, vh.count)
        self.route_names = names
        self.notes = dict(tables.reasons)
        self._flip(plan, nxt, tables.services, keep, bool(tables.routes))

    def _flip(self, plan: KernelPlan, nxt: int, services: dict[tuple[str, int], int],
              keep: set[EndpointKey], enabled: bool) -> None:
        # services: new destinations first, so the flip finds them tracked
        for ip, port in self.services - services.keys():
            self.dp.set_service(ip, port, 0, nxt)  # none in the new generation
        for (ip, port), lid in services.items():
            self.dp.set_service(ip, port, lid, nxt)
        self.pools.look(self.bound(), self.dp.pool_misses(list(self.pools.pools)))
        self.pools.wait_filled()  # warm the new pools before the flip
        timed = bool(self.timeouts or self.per_try)
        self.dp.set_enabled(nxt, enabled=enabled, access_log=self.access_log, timeouts=timed)
        if self.keeper is not None and timed:
            self.keeper.enabled.set()  # stays on: records of the old plan may be in flight
        self.gen = nxt
        for ip, port in self.services - services.keys():
            self.dp.remove_service(ip, port)  # after the flip: no longer tracked
        self.services = set(services)
        self.pools.retire(keep)
        self.plan = plan
        log.info("node %s: plan %s applied (gen %d, %s decision): %d destinations",
                 self.pod.node_id, plan.version, nxt, self.mode, len(self.services))

    # ---- events and upkeep (agent thread) ----------------------------------
    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        ev = ct.cast(data, ct.POINTER(DpEvent)).contents
        if ev.kind == DP_EV_REDIRECT:  # a record of its own layout (dp_redir.h)
            self.redirector.on_event(data, size)
        elif ev.kind == DP_EV_CLOSE:
            ups = [int(c) for c in ev.up_cookies if c]
            self.closer.moved_on(int(ev.cookie))  # a queued EOF of it would cut its next request
            self.delayer.on_close(int(ev.cookie), ups)
            self.pools.release(ups + self.retrier.on_close(int(ev.cookie), ups))
        elif ev.kind == DP_EV_RETRY:
            self.retrier.on_diverted(int(ev.up_cookies[0]), int(ev.cookie))
        elif ev.kind == DP_EV_DELAY:
            self.delayer.wake()
        elif ev.kind == DP_EV_DELAY_REPLY:
            self.delayer.on_reply(int(ev.cookie), int(ev.ts_ns), int(ev.pool), int(ev.reason),
                                  int(ev.bytes))
        elif ev.kind == DP_EV_CLOSE_REPLY:
            self.closer.after_reply(int(ev.cookie))
        elif ev.kind == DP_EV_ACCESS:
            self.access.add(ev, lambda r: self.route_names.get(r, ""),
                            lambda p: self.pool_clusters.get(p, ""))

    def _on_mirror(self, _ctx: Any, data: Any, size: int) -> None:
        self.mirrorer.on_event(data, size)

    def poll(self, timeout_ms: int) -> None:
        wait = self.retrier.wait_ms()  # a retry's backoff ends sooner
        self.dp.bpf.ring_buffer_poll(timeout_ms if wait is None else min(timeout_ms, wait))
        self.retrier.service()

    def bound(self) -> set[int]:
        return {int(k.value) for k in self.dp.bpf["dp_peer"].keys()}

    def upkeep(self) -> None:
        """Route timeouts, then the pools' look (sizing, accounting): the look at
        most every LOOK_EVERY_S, as the agent's loop turns at every batch of
        events under load."""
        if self.keeper is not None:
            self.pools.release(self.keeper.closed())  # timed out: Envoy closes those too
        for up in self.resetter.timed_out():  # before the look: U is the retrier's
            self.retrier.on_per_try(up)
        self.closer.service()  # EOFs after kernel replies to `Connection: close`
        self.outlier.service()  # ejections noticed, unejections at the interval ticks
        now = time.monotonic()
        if now - self.looked_at < LOOK_EVERY_S:
            return
        self.looked_at = now
        self.pools.look(self.bound(), self.dp.pool_misses(list(self.pools.pools)))

    # ---- views ------------------------------------------------------------
    def stats(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for (route, outcome, reason), n in read_stats(self.dp.bpf).items():
            key = (self.route_names.get(route, "" if route == 0 else f"route{route}"), outcome,
                   reason)
            out[key] = out.get(key, 0) + n
        return out

    def debug(self) -> dict[str, Any]:
        return {
            "node": self.pod.node_id, "pod": self.pod.name, "cgroup": self.pod.cgroup,
            "plan_version": self.plan.version if self.plan else None, "generation": self.gen,
            "decision": self.mode,
            "cflags": list(self.cflags),  # the synthesized program's knobs (l7fp mode)
            # how its start split: phase -> [wall s, CPU s] (loader.timed; "apply"
            # is the first plan's), and how long it was due before its start began.
            # A copy: the agent's thread adds "apply" while the view is dumped.
            "startup": {phase: list(spent) for phase, spent in dict(self.dp.timing).items()},
            "startup_queued_s": self.queued_s,
            "destinations": sorted(f"{ip}:{port}" for ip, port in self.services),
            "routes": self.route_names, "not_offloaded": self.notes,
            "inbound_plans": self.inbound_plans,
            "pools": self.pools.snapshot(), "unpaired_upstreams": self.pools.unpaired,
            "refill": dict(self.pools.timing),
            "tracked_connections": len(list(self.dp.bpf["dp_peer"].keys())),
            "counters": [{"route": r, "outcome": o, "reason": why, "requests": n}
                         for (r, o, why), n in sorted(self.stats().items())],
            "access_log": self.access.tail(50),
            "route_timeouts": {self.route_names.get(r, str(r)): ms
                               for r, ms in sorted(self.timeouts.items())},
            "per_try_timeouts": {self.route_names.get(r, str(r)): ms
                                 for r, ms in sorted(self.per_try.items())},
            "timeouts_fired": dict(self.keeper.counts) if self.keeper else {},
            "timed_requests_in_flight": len(list(self.dp.bpf["dp_tmo"].keys())),
            # LEAST_REQUEST's counts by slot (generation, cluster, endpoint), nonzero only
            "least_request_in_flight": self.dp.lr_in_flight(),
            "retries": self.retrier.debug(),
            "mirrors": self.mirrorer.debug(),
            "delays": self.delayer.debug(),
            "redirects": self.redirector.debug(),
            "resets": dict(self.resetter.counts),
            "closes": dict(self.closer.counts),
            "outlier": self.outlier.debug(),
            "handoffs": dict(self.handoff.counts),
        }

    def close(self) -> None:
        """Detach first (traffic goes the normal way), then close the pools."""
        if self.keeper is not None:
            self.keeper.close()  # its thread uses the maps: stopped first
        self.mirrorer.close()
        self.delayer.close()
        self.redirector.close()
        self.resetter.close()
        self.handoff.close()
        self.closer.close()  # its worker uses the maps
        self.dp.close()
        self.pools.close()


def cgroup_exists(path: str) -> bool:
    return Path(path).is_dir()
