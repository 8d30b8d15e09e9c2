"""The fast-path agent: loads the socket programs per pod and keeps them fed.

Owner: K2. `l7fp serve --fastpath on|auto` calls `start(server, args)` and
`stop(handle)` through `xds_server.fastpath_hook`. The agent

* learns the pods (cgroup, netns, address, node id) from the local mesh's
  state.json (docs/contracts.md): the one next to `--config DIR` (the mesh
  runs `l7fp serve --config /run/l7fp/mesh/NAME/xds`), or `--fastpath-mesh-state`;
* subscribes to the server's KernelPlans (`server.add_plan_listener`) and
  applies each to its node's datapath atomically (`fastpath.agent_node`);
* runs two threads: one polls the kernel's events (client closes, access log)
  and looks at the upstream pools (their own threads refill them), the other
  follows state.json and applies plans. A plan can need a BCC compile of
  seconds; on one thread that stalled every node's events and pool upkeep
  (measured: 7-10 s without a look while other nodes compiled, so a node
  already serving found its pools empty);
* exports `l7fp_fastpath_requests_total{node,route,outcome,reason}` in the
  server's registry and `/debug/fastpath` (via `fastpath.serve_plugin`).

Fail-safe: the programs are attached with BPF links owned by this process, so
if it dies (even kill -9) the kernel detaches them and connections go the
normal way through Envoy; `stop()` detaches explicitly. With `auto`, a kernel
without the needed BPF support gives one log line and no fast path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastpath import inbound_merge, inbound_verdict, residual_outlier, tracing
from fastpath.agent_node import NodeDatapath, PodInfo
from fastpath.agent_outlier import OutlierCollector
from fastpath.als_owner import AlsOwner
from fastpath.counters import FastpathCollector
from fastpath.inbound import inbound_transparent
from fastpath.loader import timed
from fastpath.plan import Direction, KernelPlan, ListenerPlan

log = logging.getLogger(__name__)

AGENTS: dict[int, Agent] = {}
FIRST_APPLY_WAIT = 5.0  # s a node's first compile waits for its destinations' plans  # id(server) -> agent, for /debug/fastpath
RELEASE_WAIT = 3.0  # s a detach waits for the sidecar to take its limiters back


class Agent:
    """One per `l7fp serve` process. Thread-safe entry points: on_plan, debug, stats, stop."""

    def __init__(self, state_path: Path | None, access_log: int = 1,
                 decide: str = "inline") -> None:
        """`decide`: "inline" (the data path's built-in decision), "l7fp" (K1's
        l7fp_decide synthesized per plan; a node whose program does not load
        falls back to inline with one log line)."""
        self.state_path = state_path
        self.access_log = access_log
        self.decide = decide
        self.lock = threading.Lock()
        self.plans: dict[str, KernelPlan] = {}
        self.pending: set[str] = set()
        self.recheck: set[str] = set()  # re-apply only if their merged plan changed
        self.applying: set[str] = set()  # taken from pending/recheck, being applied now
        self._applied: dict[str, Any] = {}  # node id -> (merged plan, refused) applied
        self._first_seen: dict[str, float] = {}  # node id -> when its plan was first due
        self._due_since: dict[str, float] = {}  # node id not loaded -> since when it waits
        self.pods: dict[str, PodInfo] = {}  # node id -> pod
        self.services: list[tuple[str, tuple[int, ...]]] = []  # (vip, ports)
        self.nodes: dict[str, NodeDatapath] = {}
        self.failed: dict[str, str] = {}
        self._state_mtime = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plans_thread: threading.Thread | None = None
        self.loop = {"turns": 0, "max_gap_s": 0.0}  # the event thread, for /debug/fastpath
        # rule 3, one owner per bucket: node id -> version of the plan whose
        # buckets its l7fp program runs; the server strips Envoy's limiters
        # only for these (owns_limits); `server` is set by start()
        self.owned: dict[str, str] = {}
        self.server: Any = None
        # nodes whose Envoy has an accepted outlier access-log stream open
        # (fastpath.als; the server's loop), or closed within the grace: only
        # these lose Envoy's detector
        self.als = AlsOwner()

    # ---- control (any thread) ------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7fp-fastpath", daemon=True)
        self._thread.start()
        self._plans_thread = threading.Thread(target=self._run_plans, name="l7fp-fastpath-plans",
                                              daemon=True)
        self._plans_thread.start()

    def on_plan(self, node_id: str, plan: Any) -> None:
        if not isinstance(plan, KernelPlan):
            return
        with self.lock:
            self.plans[node_id] = plan
            self.pending.add(node_id)
            # clients merge this node's inbound listeners (fastpath.inbound_merge);
            # every node with a plan: one may be compiling right now (not in nodes yet)
            self.recheck |= set(self.plans) - {node_id}

    def owns_limits(self, node_id: str, plan: Any) -> bool:
        """The server's limiter-owner predicate (XdsServer.set_limit_owner): True
        only while `plan` runs with its buckets in this node's l7fp program."""
        with self.lock:
            return not self._stop.is_set() and \
                self.owned.get(node_id) == getattr(plan, "version", None)

    def hosts_out(self, node_id: str) -> dict[str, frozenset[str]] | None:
        """The server's endpoint-health provider (XdsServer.set_endpoint_health):
        per cluster, the hosts the node's kernel outlier detection has out of
        its LB view (served to the node's Envoy as EDS UNHEALTHY), keyed by
        the cluster's ClusterLoadAssignment name; only the clusters the
        applied plan owns, only while the kernel owns the node. None while the
        node's Envoy has no outlier access-log stream open (nor closed
        within als_owner.GRACE_S): its responses would reach no detector, so
        Envoy keeps its own."""
        node = self.nodes.get(node_id)
        if not self.als.live(node_id):
            return None  # no access-log stream: Envoy's own detector stays
        if node is None or node_id not in self.owned:
            return {}
        od = node.outlier
        names = od.cla_names
        return {names[c]: h for c, h in od.lb_view.items() if c in od.owned and c in names}

    def envoy_observed(self, node_id: str, obs: list[tuple[str, str, int]]) -> None:
        """Responses the node's Envoy got (fastpath.als, on the server's loop):
        queued for the node's kernel outlier detectors (OutlierKeeper.count_envoy,
        counted on the event thread). Dropped while the kernel does not own the
        node: Envoy's own detector counts them then (after a release, draining
        connections still log: counting them too would count twice)."""
        node = self.nodes.get(node_id)
        if node is not None and node_id in self.owned and self.als.live(node_id):
            node.outlier.count_envoy(obs)

    def als_stream(self, node_id: str, live: bool) -> None:
        """The node's Envoy opened its first (live) or closed its last outlier
        access-log stream (fastpath.als, the server's loop): the kernel takes
        Envoy's detector of the owned clusters, or gives it back after
        als_owner.GRACE_S (`_als_due` on the event thread)."""
        if not live:
            self.als.closed(node_id, time.monotonic())
        elif self.als.opened(node_id, time.monotonic()) and self.server is not None:
            self.server.resplit([node_id])

    def _als_due(self, now: float) -> None:
        """Nodes whose access-log grace ended, whose logger got no stream, or
        whose backoff after that ended (event thread): Envoy's detector back,
        resp. the logger dropped, resp. offered again."""
        gone, quiet, again = self.als.due(now)
        for n in quiet:  # once per backoff step (als_owner.RETRY_FIRST_S, doubling)
            log.warning("outlier: node %s opened no access-log stream within %.0f s of its "
                        "logger: the logger is dropped, Envoy keeps its own detector; "
                        "offered again in %.0f s", n, self.als.give_up_s, self.als.retry_in(n, now))
        for n in again:
            log.info("outlier: node %s is offered the access logger again", n)
        if (gone or quiet or again) and self.server is not None:
            self.server.resplit(gone + quiet + again)

    def _lb_changed(self, node_id: str) -> None:
        """The node's kernel LB view changed (event thread): republish its residual."""
        if self.server is not None and node_id in self.owned:
            self.server.resplit([node_id])

    def _claim(self, node_id: str, plan: KernelPlan) -> None:
        """After `plan` is live in the node's l7fp program: the kernel owns its
        buckets; the server drops Envoy's limiters (both limit meanwhile)."""
        with self.lock:
            if self.owned.get(node_id) == plan.version:
                return
            self.owned[node_id] = plan.version
        if residual_outlier.logs_to_als(plan):
            self.als.served(node_id, time.monotonic())
        if self.server is not None:
            self.server.resplit([node_id])

    def release(self, node_ids: list[str], wait: bool = True) -> None:
        """Before a node's program is detached or replaced: Envoy takes its
        limiters back. With `wait` (not on the server's loop), until the
        server has published and the sidecar ACKed (bounded: RELEASE_WAIT)."""
        with self.lock:
            gone = [n for n in node_ids if self.owned.pop(n, None) is not None]
        for n in gone:
            self.als.unserved(n)
        if not gone or self.server is None:
            return
        fut = self.server.resplit(gone)
        if not wait:
            return
        end = time.monotonic() + RELEASE_WAIT
        try:
            fut.result(RELEASE_WAIT)
        except Exception:
            log.exception("fast path: handing limiters of %s back to Envoy", gone)
        while time.monotonic() < end and not all(self.server.limits_acked(n) for n in gone):
            time.sleep(0.02)

    def stop(self) -> None:
        """Hand every limiter back to Envoy, then detach (module stop() calls
        release on the server's loop first, so the push is not held here)."""
        self.release(list(self.owned), wait=False)
        self._stop.set()
        for t in (self._thread, self._plans_thread):
            if t is not None:
                t.join(10)
        with self.lock:
            for node in self.nodes.values():
                try:
                    node.close()
                except Exception:
                    log.exception("fast path: detaching node %s failed", node.pod.node_id)
            self.nodes.clear()

    # ---- the agent threads ---------------------------------------------------------
    def _run(self) -> None:
        """Events and pool looks of every node. A node whose plan is being
        applied (its `busy` lock is held) is skipped for that turn."""
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            self.loop["turns"] += 1
            self.loop["max_gap_s"] = max(self.loop["max_gap_s"], round(now - last, 4))
            last = now
            try:
                self._als_due(now)
                with self.lock:
                    nodes = list(self.nodes.values())
                # events first (closes release sockets), then the pools' look
                polled = 0
                for node in nodes:
                    if node.busy.acquire(blocking=False):
                        try:
                            node.poll(max(1, 20 // len(nodes)))
                            node.upkeep()
                            polled += 1
                        finally:
                            node.busy.release()
                if not polled:  # no node, or all busy with a plan: do not spin
                    self._stop.wait(0.05 if not nodes else 0.005)
            except Exception:
                log.exception("fast path agent loop")
                self._stop.wait(0.5)

    def _run_plans(self) -> None:
        """Mesh state and plans: compiles and table writes, off the event thread."""
        while not self._stop.is_set():
            try:
                self._follow_state()
                self._apply_pending()
            except Exception:
                log.exception("fast path agent: applying plans")
                self._stop.wait(0.5)
            self._stop.wait(0.05)

    def _follow_state(self) -> None:
        if self.state_path is None:
            return
        try:
            mtime = self.state_path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._state_mtime:
            return
        self._state_mtime = mtime
        doc = json.loads(self.state_path.read_text())
        pods = {}
        for p in doc.get("pods", []):
            if not p.get("node_id") or not p.get("cgroup"):
                continue
            ns = p.get("netns")
            pods[p["node_id"]] = PodInfo(name=p["name"], node_id=p["node_id"], cgroup=p["cgroup"],
                                         netns=f"/run/netns/{ns}" if ns else None, ip=p["ip"],
                                         ports=tuple(p.get("ports", ())))
        with self.lock:
            self.pods = pods
            self.services = [(s["vip"], tuple(s.get("ports", ()))) for s in doc.get("services", [])]
            self.pending |= set(self.plans)  # re-apply: destinations may have changed

    def _apply_pending(self) -> None:
        with self.lock:
            due = {n for n in self.pending | self.recheck if n in self.pods and n in self.plans}
            todo = [(n, self.plans[n], n not in self.pending) for n in due]
            self.pending -= due
            self.recheck.clear()
            self.applying = due
        # re-applies of loaded nodes first (milliseconds), then at most one new
        # node's compile (seconds) per turn: a plan change never waits behind
        # the first compiles of a whole mesh
        todo.sort(key=lambda t: t[0] not in self.nodes)
        now = time.monotonic()
        for node_id, _plan, _only in todo:
            if node_id not in self.nodes:
                self._due_since.setdefault(node_id, now)
        compiled = False
        for node_id, plan, only_if_changed in todo:
            try:
                compiled = self._apply_one(node_id, plan, only_if_changed, compiled)
            finally:
                with self.lock:
                    self.applying.discard(node_id)

    def _apply_one(self, node_id: str, plan: KernelPlan, only_if_changed: bool,
                   compiled: bool) -> bool:
        """One node's turn of _apply_pending; True once this turn has compiled a new node."""
        loaded = node_id in self.nodes
        if not loaded and compiled:
            with self.lock:
                (self.recheck if only_if_changed else self.pending).add(node_id)
            return compiled
        merged = inbound_merge.merge(plan, self._plan_of_ip)
        key = (merged.plan, tuple(sorted(merged.refused.items())))
        if only_if_changed and self._applied.get(node_id) == key:
            # another node's plan changed, not one this node merges (its
            # inbound listener may have stayed the same under a new version)
            self._note_inbound(node_id, merged)
            return compiled
        if self._wait_for_destinations(node_id, merged):
            with self.lock:
                self.pending.add(node_id)
            return compiled
        self._apply(node_id, plan, merged)
        self._applied[node_id] = key
        return compiled or (not loaded and node_id in self.nodes)

    def _wait_for_destinations(self, node_id: str, merged: inbound_merge.Merged) -> bool:
        """True to hold a node's first compile back a little (at most
        FIRST_APPLY_WAIT s) while pods it calls have no plan yet: merging
        their inbound listeners later changes the compiled program, and a
        rebuild costs another compile (seconds per node on these cores)."""
        if node_id in self.nodes:
            return False
        first = self._first_seen.setdefault(node_id, time.monotonic())
        if time.monotonic() - first > FIRST_APPLY_WAIT:
            return False
        known = {p.ip for p in self.pods.values()}
        return any(why == inbound_merge.NO_PLAN and ip in known
                   for (ip, _port), why in merged.refused.items())

    def _apply(self, node_id: str, plan: KernelPlan, merged: inbound_merge.Merged) -> None:
        """Apply `plan` (l7fp: with its destinations' inbound listeners merged in)."""
        node = self.nodes.get(node_id)
        if node is None and not any(lst.direction is Direction.OUTBOUND
                                    for lst in plan.listeners):
            self._due_since.pop(node_id, None)
            return  # nothing for the kernel to do on this node's client side
        if node is not None and node.mode == "l7fp" and _cflags(merged.plan) != node.cflags:
            # the plan needs another compiled program: rebuild the node; its
            # connections lose their upstreams and go to Envoy (never misrouted)
            self.release([node_id])  # Envoy limits first (make-before-break)
            with self.lock:
                self.nodes.pop(node_id, None)
            with node.busy:
                node.close()
                node.dp.unload()
            node = None
        first = node is None
        if node is None:
            queued = time.monotonic() - self._due_since.pop(node_id, time.monotonic())
            node = self._start_node(node_id, merged.plan)
            if node is None:
                return
            if self._stop.is_set():  # stopped during the compile: attach nothing
                node.close()
                return
            node.queued_s = round(queued, 3)
            node.outlier.on_lb_change = functools.partial(self._lb_changed, node_id)
            with self.lock:
                self.nodes[node_id] = node
        # the event thread skips this node meanwhile (busy)
        with node.busy, timed(node.dp.timing if first else None, "apply"):
            if node.mode == "l7fp":
                node.apply(merged.plan, self._vips, self._netns_of,
                           merged.offloadable,
                           self._cgroup_of)
                node.notes.update({f"inbound {ip}:{port}": why
                                   for (ip, port), why in merged.refused.items()
                                   if why != inbound_merge.NOT_ROUTED})
                self._note_inbound(node_id, merged)
                claim = True
            else:
                node.apply(plan, self._vips, self._netns_of, self._inbound_ok, self._cgroup_of)
                claim = False  # the built-in decision offers no rate limit to the kernel
        if claim:
            self._claim(node_id, plan)
        else:
            self.release([node_id])

    def _note_inbound(self, node_id: str, merged: inbound_merge.Merged) -> None:
        """Which plan version of each destination the node's kernel decides the
        inbound side with (`/debug/fastpath` "inbound_plans", checked by `l7fp
        mesh audit`): the merged listeners equal that version's."""
        node = self.nodes.get(node_id)
        if isinstance(node, NodeDatapath) and node.mode == "l7fp":
            node.inbound_plans = {f"{ip}:{port}": v for (ip, port), v in merged.versions.items()}

    def _start_node(self, node_id: str, plan: KernelPlan) -> NodeDatapath | None:
        if node_id in self.failed:
            return None
        pod = self.pods[node_id]
        if self.decide == "l7fp":
            try:
                return NodeDatapath.start(pod, access_log=self.access_log, mode="l7fp",
                                          cflags=_cflags(plan))
            except Exception as exc:
                log.error("fast path: node %s: l7fp_decide program failed (%s); "
                          "using the built-in decision", node_id, str(exc).splitlines()[0])
        try:
            return NodeDatapath.start(pod, access_log=self.access_log)
        except Exception as exc:
            self.failed[node_id] = str(exc)
            log.error("fast path: node %s stays on Envoy: %s", node_id, exc)
            return None

    # ---- plan context ------------------------------------------------------------
    def _vips(self, lst: ListenerPlan) -> list[tuple[str, int]]:
        if lst.address not in ("0.0.0.0", "::", ""):
            return [(lst.address, lst.port)]
        return [(vip, lst.port) for vip, ports in self.services if lst.port in ports]

    def _netns_of(self, ip: str) -> str | None:
        for pod in self.pods.values():
            if pod.ip == ip:
                return pod.netns
        return None

    def _cgroup_of(self, ip: str) -> str | None:
        for pod in self.pods.values():
            if pod.ip == ip:
                return pod.cgroup
        return None

    def _plan_of_ip(self, ip: str) -> KernelPlan | None:
        pod = next((p for p in self.pods.values() if p.ip == ip), None)
        return self.plans.get(pod.node_id) if pod is not None else None

    def plan_view(self, node_id: str) -> KernelPlan | None:
        """The node's plan with the verdicts its destinations' inbound side
        decides (fastpath.inbound_verdict): what `/debug/fastpath/plans` shows.
        Its outbound side takes the node's loaded decision (an l7fp node may
        fall back to inline), else the agent's; its inbound side the clients'
        (`_clients_decide`): they merge it, or not."""
        with self.lock:
            plan = self.plans.get(node_id)
            node = self.nodes.get(node_id)
            pod = self.pods.get(node_id)
            clients = {} if pod is None else {n: p for n, p in self.plans.items()
                                              if _reaches(p, pod.ip)}
            inbound = self._clients_decide(clients)
            callers = None if pod is None else inbound_verdict.Callers(pod.ip, tuple(
                p for n, p in clients.items() if n != node_id))
        if plan is None:
            return None
        decide = node.mode if node is not None else self.decide
        return inbound_verdict.honest_plan(plan, self._plan_of_ip, decide, inbound, callers)

    def _clients_decide(self, clients: dict[str, KernelPlan]) -> str:
        """The decision of `clients`, the nodes whose kernel pools a pod (caller
        holds the lock): "l7fp" when any of them runs (or, not loaded yet, would
        run) l7fp_decide, since it may merge the pod's inbound side; "inline"
        when all run the built-in decision; the agent's when none reaches it."""
        modes = {getattr(self.nodes.get(n), "mode", self.decide) for n in clients}
        if not modes:
            return self.decide
        return "l7fp" if "l7fp" in modes else "inline"

    def _inbound_ok(self, ip: str, port: int) -> bool:
        """True when the pod at ip has a known plan whose inbound side for `port`
        forwards every request unchanged (rule 4: skipping it loses nothing)."""
        pod = next((p for p in self.pods.values() if p.ip == ip), None)
        if pod is None:
            return False
        plan = self.plans.get(pod.node_id)
        return plan is not None and inbound_transparent(plan.listeners, port)

    # ---- views -------------------------------------------------------------------
    def stats(self) -> list[tuple[str, dict[tuple[str, str, str], int]]]:
        with self.lock:
            nodes = list(self.nodes.items())
        return [(n, node.stats()) for n, node in nodes]

    def timeout_counts(self) -> list[tuple[str, dict[str, int]]]:
        """Per node, what the route timer did (fastpath.timeouts.TimeoutKeeper.counts)."""
        with self.lock:
            nodes = list(self.nodes.items())
        return [(n, dict(node.keeper.counts)) for n, node in nodes if node.keeper is not None]

    def outlier_counts(self) -> list[tuple[str, dict[str, dict[str, int]]]]:
        """Per node, the kernel's outlier detectors (OutlierKeeper.counts)."""
        with self.lock:
            nodes = list(self.nodes.items())
        return [(n, node.outlier.counts()) for n, node in nodes]

    def reset_counts(self) -> list[tuple[str, dict[str, int]]]:
        """Per node, what fastpath.agent_reset did (Resetter.counts)."""
        with self.lock:
            nodes = list(self.nodes.items())
        return [(n, dict(node.resetter.counts)) for n, node in nodes]

    def plans_due(self) -> list[str]:
        """Pods' node ids whose plan the agent has yet to apply or recheck, or
        is applying now: such a node may still be re-applied or rebuilt (its
        connections then go to Envoy). mesh.ready waits until there is none."""
        with self.lock:
            return sorted(n for n in self.pending | self.recheck | self.applying
                          if n in self.pods)

    def debug(self) -> dict[str, Any]:
        with self.lock:
            nodes = list(self.nodes.values())
        return {"state": str(self.state_path) if self.state_path else None,
                "pods_known": sorted(self.pods), "plans_known": sorted(self.plans),
                "plans_due": self.plans_due(),
                "nodes_failed": self.failed, "event_loop": dict(self.loop),
                "limits_owned": dict(self.owned),  # node -> plan version (rule 3)
                "outlier_access_log": self.als.debug(time.monotonic()),
                "nodes": [n.debug() for n in nodes]}


def _reaches(plan: KernelPlan, ip: str) -> bool:
    """The node with `plan` may pool the pod at `ip` (it is its client)."""
    return any(ep_ip == ip for eps in inbound_merge.kernel_endpoints(plan).values() for ep_ip, _ in eps)


def _cflags(plan: KernelPlan) -> tuple[str, ...]:
    from fastpath.agent_delay import needs_delay
    from fastpath.agent_mirror import needs_mirror
    from fastpath.agent_outlier import needs_outlier
    from fastpath.agent_redirect import needs_redirect
    from fastpath.agent_retry import needs_retry
    from fastpath.synth import synthesize

    retry = ("-DDP_RETRY=1",) if needs_retry(plan) else ()  # compiled in only when used
    inbound = ("-DDP_INBOUND=1",) if inbound_merge.has_merged(plan) else ()  # the same
    mirror = ("-DDP_MIRROR=1",) if needs_mirror(plan) else ()  # the same
    delay = ("-DDP_DELAY=1",) if needs_delay(plan) else ()  # the same
    redirect = ("-DDP_REDIR=1",) if needs_redirect(plan) else ()  # the same
    outlier = ("-DDP_OUTLIER=1",) if needs_outlier(plan) else ()  # the same
    trace = tracing.cflags(plan)  # the same (dp_xrid.h)
    return synthesize(plan).cflags + retry + inbound + mirror + delay + redirect + outlier + trace


def kernel_ready() -> str | None:
    """Why the fast path cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except Exception as exc:
        return f"BCC not importable ({exc})"
    try:
        from fastpath.loader import cgroup2_root

        cgroup2_root()
    except RuntimeError as exc:
        return str(exc)
    return None


def _state_path(args: Any) -> Path | None:
    explicit = getattr(args, "fastpath_mesh_state", None)
    if explicit:
        return Path(explicit)
    cfg = getattr(args, "config", None)
    if cfg:
        return Path(cfg).resolve().parent / "state.json"
    return None


def start(server: Any, args: Any) -> Agent | None:
    """Hook for `l7fp serve` (xds_server.fastpath_hook). None when the fast path is off."""
    mode = getattr(args, "fastpath", "auto")
    problem = kernel_ready()
    if problem:
        if mode == "on":
            raise RuntimeError(f"--fastpath on: the kernel fast path cannot run: {problem}")
        log.warning("fast path off: %s (Envoy serves every request)", problem)
        return None
    sample = 0 if getattr(args, "fastpath_no_access_log", False) else \
        getattr(args, "fastpath_access_log", 16)
    agent = Agent(_state_path(args), access_log=sample,
                  decide=getattr(args, "fastpath_decide", "l7fp"))
    agent.server = server
    if hasattr(server, "set_limit_owner"):
        server.set_limit_owner(agent.owns_limits)
    if hasattr(server, "set_endpoint_health"):
        server.set_endpoint_health(agent.hosts_out)
    if hasattr(server, "set_access_log_off"):
        server.set_access_log_off(agent.als.given_up, residual_outlier.without_als)
    server.add_plan_listener(agent.on_plan)
    registry = getattr(getattr(server, "metrics", None), "registry", None)
    if registry is not None:
        registry.register(FastpathCollector(agent.stats, agent.timeout_counts,
                                            agent.reset_counts))
        registry.register(OutlierCollector(agent.outlier_counts))
    agent.start()
    AGENTS[id(server)] = agent
    log.info("fast path agent started (mesh state: %s)%s", agent.state_path, _no_state(agent.state_path))
    return agent


def _no_state(path: Path | None) -> str:
    """Said at start when there is no mesh state yet: `serve --config examples/basic` has no
    pods, so nothing is attached until a mesh runner writes the file."""
    if path is not None and path.exists():
        return ""
    return "; no such file yet: no pod gets the fast path until it appears (--fastpath-mesh-state FILE)"


async def stop(agent: Agent | None) -> None:
    """Hook for `l7fp serve` shutdown, on the server's loop: Envoy takes every
    limiter back (pushed, ACKed or RELEASE_WAIT s), then the programs detach."""
    if agent is None:
        return
    server = agent.server
    if server is not None and hasattr(server, "set_limit_owner"):
        server.set_limit_owner(None)  # first: a claim racing this stop strips nothing
    if server is not None and hasattr(server, "set_endpoint_health"):
        server.set_endpoint_health(None)
    if server is not None and hasattr(server, "set_access_log_off"):
        server.set_access_log_off(None, None)
    owned = list(agent.owned)
    agent.release(owned, wait=False)  # on the loop: published at once
    if server is not None:
        end = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < end and not all(server.limits_acked(n) for n in owned):
            await asyncio.sleep(0.02)
    agent.stop()
    for k, v in list(AGENTS.items()):
        if v is agent:
            del AGENTS[k]
    log.info("fast path agent stopped: programs detached")
