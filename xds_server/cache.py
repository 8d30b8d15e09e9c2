"""Per-node snapshot cache with watches (the go-control-plane cache/server boundary).

Owned by xds_server.server (one cache per server). Producers call
`set_snapshot(node_id, snap)`, which checks references first and refuses an
inconsistent snapshot (InconsistentSnapshot; the previous one stays). Streams
call `watch(node_id, callback)` and get `callback(snapshot, born)` on each
publish for their node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from xds_server import consistency
from xds_server.snapshot import Snapshot

log = logging.getLogger(__name__)

Watcher = Callable[[Snapshot, float], None]


@dataclass
class NodeEntry:
    snapshot: Snapshot
    born: float  # monotonic time the change behind this snapshot was first seen
    published_at: float  # wall clock, for the debug pages
    last_error: str = ""


class SnapshotCache:
    """Snapshots by node id, consistency-checked, with watches per node."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeEntry] = {}
        self._watches: dict[str, dict[int, Watcher]] = {}
        self._next_watch = 0

    def set_snapshot(self, node_id: str, snap: Snapshot, born: float | None = None) -> bool:
        """Publish `snap` for `node_id`; True if it changed anything.

        Raises consistency.InconsistentSnapshot (naming each unresolved reference)
        and keeps the previous snapshot in that case.
        """
        try:
            consistency.check(snap)
        except consistency.InconsistentSnapshot as exc:
            old = self._nodes.get(node_id)
            if old is not None:
                old.last_error = str(exc)
            raise
        born = time.monotonic() if born is None else born
        old = self._nodes.get(node_id)
        if old is not None and old.snapshot.versions == snap.versions:
            old.last_error = ""
            return False
        self._nodes[node_id] = NodeEntry(snap, born, time.time())
        for cb in list(self._watches.get(node_id, {}).values()):
            cb(snap, born)
        return True

    def get(self, node_id: str) -> Snapshot | None:
        e = self._nodes.get(node_id)
        return e.snapshot if e else None

    def entry(self, node_id: str) -> NodeEntry | None:
        return self._nodes.get(node_id)

    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    def clear(self, node_id: str) -> None:
        """Forget a node's snapshot (no streams left); the next stream rebuilds it."""
        if not self._watches.get(node_id):
            self._nodes.pop(node_id, None)

    def watch(self, node_id: str, cb: Watcher) -> Callable[[], None]:
        """Call `cb(snapshot, born)` on each publish for node_id; returns the cancel function.

        If the node already has a snapshot, `cb` is called with it at once.
        """
        self._next_watch += 1
        wid = self._next_watch
        self._watches.setdefault(node_id, {})[wid] = cb
        e = self._nodes.get(node_id)
        if e is not None:
            cb(e.snapshot, e.born)

        def cancel() -> None:
            ws = self._watches.get(node_id)
            if ws is not None:
                ws.pop(wid, None)
                if not ws:
                    del self._watches[node_id]

        return cancel

    def watched(self) -> list[str]:
        return sorted(self._watches)
