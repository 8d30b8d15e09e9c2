"""Which nodes' Envoys hand their outlier detectors to the kernel (rule 3), by
their access-log streams; sans-I/O (every call takes `now`, monotonic seconds).

Owned by `fastpath.agent.Agent` (`als`): `opened` / `closed` are called from
fastpath.als's `on_stream` on the server's loop, `due` by the agent's event
thread each turn (the nodes it returns are republished: `resplit`), `live` by
the server's loop (`Agent.hosts_out`, `envoy_observed`). A lock makes the
threads safe.

A node is live from its first accepted stream until GRACE_S after its last
one closed: a stream that drops and reconnects within the grace changes
nothing. Giving ownership back costs a CDS push of every owned cluster
(outlier_detection back on: Envoy rebuilds the cluster and drains its
connection pools) and the EDS marks go; taking it again costs the same.
"""

from __future__ import annotations

import threading

GRACE_S = 5.0  # a closed last stream gives Envoy its detector back after this


class AlsOwner:
    """Per node: live (an accepted stream open, or closed less than GRACE_S ago)."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._live: set[str] = set()
        self._closing: dict[str, float] = {}  # node -> when its grace ends
        self._lock = threading.Lock()

    def live(self, node: str) -> bool:
        return node in self._live

    def opened(self, node: str, now: float) -> bool:
        """The node's first stream is accepted; True: ownership changes (republish)."""
        with self._lock:
            self._closing.pop(node, None)  # a reconnect within the grace
            if node in self._live:
                return False
            self._live.add(node)
            return True

    def closed(self, node: str, now: float) -> None:
        """The node's last stream ended: ownership goes back after the grace."""
        with self._lock:
            if node in self._live:
                self._closing[node] = now + self.grace_s

    def due(self, now: float) -> list[str]:
        """Nodes whose grace ended now: no longer live (republish them)."""
        with self._lock:
            gone = [n for n, end in self._closing.items() if now >= end]
            for n in gone:
                del self._closing[n]
                self._live.discard(n)
            return gone

    def debug(self, now: float) -> dict[str, object]:
        """/debug/fastpath `outlier_access_log`."""
        with self._lock:
            return {"live": sorted(self._live),
                    "grace_left_s": {n: round(max(0.0, end - now), 2)
                                     for n, end in sorted(self._closing.items())}}
