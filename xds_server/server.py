"""The control plane core: sources -> (split) -> per-node snapshots -> cache -> streams.

Owned by `l7fp serve` (xds_server.serve), the demo and tests, which create one
XdsServer, `await start()`, serve its `ads` servicer over grpclib and its admin
app over aiohttp, and `await stop()`.

Other packages may call:
* `add_plan_listener(cb)`: cb(node_id, plan) for each new fast-path plan;
* `plans`: the latest KernelPlan per node id;
* `request_push()`: a source changed (sources do this through Source.changed()).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any as AnyT

from xds_server import consistency
from xds_server.cache import SnapshotCache
from xds_server.debounce import Debouncer
from xds_server.fastpath_hook import Splitter
from xds_server.metrics import Metrics
from xds_server.node import NodeInfo
from xds_server.snapshot import Snapshot
from xds_server.sources.base import DuplicateResource, NodeResources, Source, combine

log = logging.getLogger(__name__)
PlanListener = Callable[[str, AnyT], None]


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
        self._split_memo: dict[str, tuple[Hashable, Snapshot]] = {}
        self._memo: dict[Hashable, Snapshot] = {}
        self._debouncer = Debouncer(self._push, debounce, debounce_max)
        for s in sources:
            s.on_change(self.request_push)

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> None:
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
            # The split is a pure function of (node, resources): skip it when neither changed.
            hit = self._split_memo.get(node.id)
            if hit is not None and hit[0] == parts.key:
                return hit[1]
            residual = self._split(node, parts)
            if residual is not None:
                split = Snapshot.from_messages(residual, parts.origins)
                self._split_memo[node.id] = (parts.key, split)
                return split
        if used is not None:
            used.add(parts.key)
        snap = self._memo.get(parts.key)
        if snap is None:
            snap = Snapshot.from_messages(parts.resources, parts.origins)
            self._memo[parts.key] = snap
        return snap

    def _split(self, node: NodeInfo, parts: NodeResources) -> dict[str, list[AnyT]] | None:
        assert self.splitter is not None
        try:
            result = self.splitter(node.id, parts.resources)
            residual = result.residual
        except Exception:
            self.metrics.split_errors.inc()
            log.exception("fast path split failed for node %s; serving it unsplit", node.id)
            return None
        self._set_plan(node.id, result.plan)
        return residual  # type: ignore[no-any-return]
