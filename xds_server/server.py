"""The control plane core: sources -> (split) -> per-node snapshots -> cache -> streams.

Owned by `l7fp serve` (xds_server.serve), the demo and tests, which create one
XdsServer, `await start()`, serve its `ads` servicer over grpclib and its admin
app over aiohttp, and `await stop()`.

Other packages may call:
* `add_plan_listener(cb)`: cb(node_id, plan) for each new fast-path plan;
* `plans`: the latest KernelPlan per node id;
* `request_push()`: a source changed (sources do this through Source.changed());
* `set_limit_owner(pred)` / `resplit(node_ids)`: the fast-path agent says which
  nodes' rate limiters the kernel owns (docs/contracts.md, "Limiter ownership");
* `set_endpoint_health(fn)`: fn(node_id) -> {CLA name: hosts out of the kernel's
  LB view}, marked UNHEALTHY in that node's residual EDS while the kernel owns
  the node's stateful policy (xds_server.eds_health), or None: the kernel does
  not own the node's outlier detection (yet), Envoy keeps its detectors;
  `resplit` republishes;
* `set_access_log_off(pred, strip)`: pred(node_id) True: while Envoy keeps its
  detectors (endpoint health None), the node's residual is `strip(residual)`
  (the fast path's outlier access logger removed: its stream never came).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any as AnyT

from xds_server import consistency, eds_health
from xds_server.cache import SnapshotCache
from xds_server.debounce import Debouncer
from xds_server.fastpath_hook import Splitter
from xds_server.metrics import Metrics
from xds_server.node import NodeInfo
from xds_server.snapshot import Snapshot
from xds_server.sources.base import DuplicateResource, NodeResources, Source, combine

log = logging.getLogger(__name__)
PlanListener = Callable[[str, AnyT], None]
LimitOwner = Callable[[str, AnyT], bool]  # (node id, plan) -> the kernel owns its limiters
# node id -> {CLA name: hosts out}, None: Envoy keeps its outlier detectors
EndpointHealth = Callable[[str], eds_health.HostsOut | None]


def _nobody_owns(_node_id: str, _plan: AnyT) -> bool:
    return False


def _none_out(_node_id: str) -> eds_health.HostsOut | None:
    return None


def _never(_node_id: str) -> bool:
    return False


def _same(res: dict[str, list[AnyT]]) -> dict[str, list[AnyT]]:
    return res


class XdsServer:
    """Builds and publishes per-node snapshots; `ads` (set by ads.AdsService) serves them."""

    def __init__(
        self,
        sources: list[Source],
        *,
        debounce: float = 0.1,
        debounce_max: float = 10.0,
        splitter: Splitter | None = None,
    ) -> None:
        self.sources = sources
        self.cache = SnapshotCache()
        self.metrics = Metrics()
        self.splitter = splitter
        self.nodes: dict[str, NodeInfo] = {}
        self.plans: dict[str, AnyT] = {}
        self.errors: dict[str, str] = {}
        self.connections: dict[int, AnyT] = {}  # stream id -> ads.Connection
        self.ready = False
        self.started_at = time.time()
        self.last_push: dict[str, AnyT] = {}
        self._plan_listeners: list[PlanListener] = []
        self._streams: dict[str, int] = {}
        self._split_memo: dict[str, _SplitMemo] = {}  # node id -> its split, its residual snapshots
        self.limit_owner: LimitOwner = _nobody_owns
        self.endpoint_health: EndpointHealth = _none_out
        self._last_out: dict[str, eds_health.HostsOut | None] = {}  # node -> last good answer
        self.log_off: Callable[[str], bool] = _never
        self.strip_log: Callable[[dict[str, list[AnyT]]], dict[str, list[AnyT]]] = _same
        self._loop: asyncio.AbstractEventLoop | None = None
        self._memo: dict[Hashable, Snapshot] = {}
        self._debouncer = Debouncer(self._push, debounce, debounce_max)
        for s in sources:
            s.on_change(self.request_push)
            s.on_reject(self.metrics.config_errors.inc)

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for s in self.sources:
            await s.start()
        self._debouncer.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self._debouncer.stop()
        for s in self.sources:
            await s.stop()

    # -- plans (fast path) ------------------------------------------------
    def add_plan_listener(self, cb: PlanListener) -> None:
        """cb(node_id, plan) on each new plan; called at once with the current plans."""
        self._plan_listeners.append(cb)
        for node_id, plan in list(self.plans.items()):
            cb(node_id, plan)

    def _set_plan(self, node_id: str, plan: AnyT) -> None:
        self.plans[node_id] = plan
        for cb in list(self._plan_listeners):
            try:
                cb(node_id, plan)
            except Exception:
                log.exception("plan listener failed for node %s", node_id)

    # -- limiter ownership (fast path) --------------------------------------
    def set_limit_owner(self, pred: LimitOwner | None) -> None:
        """pred(node_id, plan) -> True when the kernel enforces that plan's rate
        limits for the node (the agent's program with the plan's buckets is live).
        Until then, and with None, every limiter stays in the node's residual."""
        self.limit_owner = pred or _nobody_owns

    def set_endpoint_health(self, fn: EndpointHealth | None) -> None:
        """fn(node_id) -> {CLA name: "ip:port" hosts the kernel's outlier detection
        has out of its LB view}; served as EDS UNHEALTHY in the node's residual
        while the kernel owns the node (limit_owner), so Envoy skips them too.
        None: the kernel does not own the node's outlier detection; the
        residual keeps Envoy's detectors (eds_health.with_detectors). Called
        on the server's loop at each publish: keep it a cheap read."""
        self.endpoint_health = fn or _none_out

    def set_access_log_off(self, pred: Callable[[str], bool] | None,
                           strip: Callable[[dict[str, list[AnyT]]], dict[str, list[AnyT]]] | None
                           ) -> None:
        """pred(node_id) True: the node's residual, while Envoy keeps its
        detectors, is `strip(residual)` (no outlier access logger). None: never."""
        self.log_off, self.strip_log = pred or _never, strip or _same

    def resplit(self, node_ids: Iterable[str]) -> concurrent.futures.Future[int]:
        """Re-evaluate ownership and publish `node_ids` now (any thread).

        The future completes once the snapshots are in the cache (pushed to the
        streams); called on the server's own loop (or before start) it runs at once."""
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        ids = list(node_ids)

        def run() -> None:
            try:
                n = sum(self.update_node(self.nodes[i], None, None) for i in ids if i in self.nodes)
                fut.set_result(n)
            except Exception as exc:  # the caller waits on it: never leave it pending
                fut.set_exception(exc)

        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or loop.is_closed():
            run()
        else:
            loop.call_soon_threadsafe(run)
        return fut

    def limits_acked(self, node_id: str) -> bool:
        """True when every stream of the node has ACKed its current listeners and
        route configs (SotW; a delta stream: nothing pending). The agent waits
        for this before it detaches a node whose limiters Envoy takes back."""
        snap = self.cache.get(node_id)
        for conn in list(self.connections.values()):
            if conn.node.id != node_id or snap is None:
                continue
            for type_url, ts in list(conn.state.types.items()):
                if not type_url.endswith(("Listener", "RouteConfiguration")):
                    continue
                if getattr(ts, "pending", False):
                    return False
                acked = getattr(ts, "acked_version", None)
                if acked is not None and acked != snap.version(type_url):
                    return False
        return True

    # -- snapshots --------------------------------------------------------
    def request_push(self) -> None:
        """A source changed: rebuild all known nodes after the debounce."""
        self._debouncer.trigger()

    async def _push(self, born: float, count: int) -> None:
        self.metrics.push_triggers.labels("config").inc()
        changed = self.rebuild(born)
        self.last_push = {"at": time.time(), "changes": count, "nodes_changed": changed}

    def rebuild(self, born: float | None = None) -> int:
        """Rebuild every known node now; returns how many snapshots changed."""
        used: set[Hashable] = set()
        changed = 0
        for node in list(self.nodes.values()):
            changed += self.update_node(node, born, used)
        self._memo = {k: v for k, v in self._memo.items() if k in used}
        return changed

    def ensure_node(self, node: NodeInfo) -> None:
        """Called by a new stream: build the node's snapshot if it has none yet."""
        known = self.nodes.get(node.id)
        self.nodes[node.id] = node
        if known != node or self.cache.get(node.id) is None:  # new, or its cluster changed
            self.update_node(node, None, None)

    def stream_opened(self, node_id: str) -> None:
        self._streams[node_id] = self._streams.get(node_id, 0) + 1

    def stream_closed(self, node_id: str) -> None:
        """Forget the node (and its snapshot) when its last stream ends."""
        left = self._streams.get(node_id, 1) - 1
        if left > 0:
            self._streams[node_id] = left
            return
        self._streams.pop(node_id, None)
        self._split_memo.pop(node_id, None)
        self._last_out.pop(node_id, None)  # a node back later starts with no stale marks
        self.nodes.pop(node_id, None)
        self.cache.clear(node_id)

    def update_node(self, node: NodeInfo, born: float | None, used: set[Hashable] | None) -> int:
        try:
            parts = combine([s.resources_for(node) for s in self.sources])
            snap = self._snapshot(node, parts, used)
            published = self.cache.set_snapshot(node.id, snap, born)
        except (consistency.InconsistentSnapshot, DuplicateResource) as exc:
            self.metrics.snapshot_rejects.inc()
            self.errors[node.id] = str(exc)
            if self.cache.get(node.id) is None:  # nothing served yet: serve empty, not stall
                self.cache.set_snapshot(node.id, Snapshot.empty(), born)
            log.error("snapshot for node %s refused, previous stays: %s", node.id, exc)
            return 0
        self.errors.pop(node.id, None)
        return int(published)

    def _snapshot(self, node: NodeInfo, parts: NodeResources, used: set[Hashable] | None) -> Snapshot:
        if self.splitter is not None:
            split = self._split_snapshot(node, parts)
            if split is not None:
                return split
        if used is not None:
            used.add(parts.key)
        snap = self._memo.get(parts.key)
        if snap is None:
            snap = Snapshot.from_messages(parts.resources, parts.origins)
            self._memo[parts.key] = snap
        return snap

    def _split_snapshot(self, node: NodeInfo, parts: NodeResources) -> Snapshot | None:
        """The node's residual snapshot, or None to serve it unsplit.

        The split is a pure function of (node, resources): it runs again only
        when they changed. Which residual is served also depends on who owns the
        rate limiters and the outlier detectors (rule 3), on the hosts out
        of the kernel's LB view and on whether the outlier logger is dropped:
        per resources, the memo key is (limiters owned, detectors owned,
        hosts out, logger off)."""
        hit = self._split_memo.get(node.id)
        if hit is None or hit.key != parts.key:
            result = self._split(node, parts)
            if result is None:
                return None
            hit = _SplitMemo(parts.key, result)
            self._split_memo[node.id] = hit
        result, snaps = hit.result, hit.snaps
        # an unsure owner keeps the limiters in Envoy; unsure of the log: keep it
        owned = bool(_ask("limiter owner", self.limit_owner, False, node.id, result.plan))
        out = self._hosts_out(node.id) if owned else None
        off = owned and out is None and bool(_ask("access log", self.log_off, False, node.id))
        memo = (owned, out is not None, eds_health.key(out or {}), off)
        snap = snaps.get(memo)
        if snap is None:
            if owned and out is None:  # the kernel has no access log of Envoy's path
                residual = hit.with_detectors(parts)
            else:
                residual = _residual(result, owned, parts)
            if off:  # ... and never will: no logger to pay for
                residual = self.strip_log(residual)
            snap = Snapshot.from_messages(eds_health.overlay(residual, out or {}), parts.origins)
            for k in [k for k in snaps if k[2]]:  # keep one health overlay per node
                del snaps[k]
            snaps[memo] = snap
        return snap

    def _hosts_out(self, node_id: str) -> eds_health.HostsOut | None:
        """The provider's answer; when it raises, the node's last good one
        (Envoy keeps the marks and detectors it has: dropping the marks would
        bring ejected hosts back with no detector of Envoy's own)."""
        out = _ask("endpoint health", self.endpoint_health, self._last_out.get(node_id), node_id)
        self._last_out[node_id] = out
        return out

    def _split(self, node: NodeInfo, parts: NodeResources) -> AnyT | None:
        assert self.splitter is not None
        try:
            result = self.splitter(node.id, parts.resources)
            result.residual  # noqa: B018 - a result without one is a split failure
        except Exception:
            self.metrics.split_errors.inc()
            log.exception("fast path split failed for node %s; serving it unsplit", node.id)
            return None
        self._set_plan(node.id, result.plan)
        return result


@dataclass
class _SplitMemo:
    """One node's split (`_split_snapshot`): the resources key it was made
    from, the splitter's result and the residual snapshots built from it,
    by (limiters owned, detectors owned, hosts out, logger off)."""

    key: Hashable
    result: AnyT
    snaps: dict[tuple[bool, bool, Hashable, bool], Snapshot] = field(default_factory=dict)
    _detected: dict[str, list[AnyT]] | None = None

    def with_detectors(self, parts: NodeResources) -> dict[str, list[AnyT]]:
        """The kernel-owned residual with Envoy's outlier detectors back
        (eds_health.with_detectors), built once per split: it depends on the
        result alone, not on the logger or the hosts out."""
        if self._detected is None:
            self._detected = eds_health.with_detectors(
                _residual(self.result, True, parts), _residual(self.result, False, parts))
        return self._detected


def _ask(what: str, provider: Callable[..., AnyT], default: AnyT, node_id: str, *args: AnyT) -> AnyT:
    """`provider(node_id, *args)` (a fast-path seam), or `default` when it
    raises: logged as "WHAT check failed for node ID" with the traceback."""
    try:
        return provider(node_id, *args)
    except Exception:
        log.exception("%s check failed for node %s", what, node_id)
        return default


def _residual(result: AnyT, kernel_owns: bool, parts: NodeResources) -> dict[str, list[AnyT]]:
    """`result.residual` when the kernel owns the node's limiters, else the
    residual that keeps every limiter (`envoy_residual`; a splitter without
    one: the resources as given, which keep them too)."""
    if kernel_owns:
        return result.residual  # type: ignore[no-any-return]
    return getattr(result, "envoy_residual", None) or parts.resources
