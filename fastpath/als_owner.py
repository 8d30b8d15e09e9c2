"""Which nodes' Envoys hand their outlier detectors to the kernel (rule 3), by
their access-log streams; sans-I/O (every call takes `now`, monotonic seconds).

Owned by `fastpath.agent.Agent` (`als`): `opened` / `closed` are called from
fastpath.als's `on_stream` on the server's loop, `due` by the agent's event
thread each turn (the nodes it returns are republished: `resplit`), `live` by
the server's loop (`Agent.hosts_out`, `envoy_observed`). A lock makes the
threads safe.

A node is live from its first accepted stream until GRACE_S after its last
one closed: a stream that drops and reconnects within the grace changes
nothing. A node whose residual has had the logger GIVE_UP_S (`served`)
without ever an accepted stream (Istio: pilot-agent's xds-grpc proxy serves
ADS only; NAT) is given up (`given_up`): its residual loses the logger, whose
cost Envoy would pay forever for nothing. Envoy opens the stream at its first
logged attempt only, so a node whose Envoy's path sends no request to an
owned cluster in that time is given up too (Envoy's detector then keeps
Envoy's path, as before the kernel took it).

Giving ownership back costs a CDS push of every owned cluster
(outlier_detection back on: Envoy rebuilds the cluster and drains its
connection pools) and the EDS marks go; taking it again costs the same.
"""

from __future__ import annotations

import threading

GRACE_S = 5.0  # a closed last stream gives Envoy its detector back after this
GIVE_UP_S = 30.0  # a logger served this long without an accepted stream: dropped


class AlsOwner:
    """Per node: live (an accepted stream open, or closed less than GRACE_S ago)."""

    def __init__(self, grace_s: float = GRACE_S, give_up_s: float = GIVE_UP_S) -> None:
        self.grace_s, self.give_up_s = grace_s, give_up_s
        self._live: set[str] = set()
        self._closing: dict[str, float] = {}  # node -> when its grace ends
        self._waiting: dict[str, float] = {}  # node -> when its logger was first served
        self._given_up: set[str] = set()
        self._proven: set[str] = set()  # had an accepted stream: never given up
        self._lock = threading.Lock()

    def live(self, node: str) -> bool:
        return node in self._live

    def given_up(self, node: str) -> bool:
        """The node's residual gets no logger any more (the server's seam)."""
        return node in self._given_up

    def served(self, node: str, now: float) -> None:
        """The kernel owns the node and its residual has the logger (the
        agent's claim): its stream is due within GIVE_UP_S."""
        with self._lock:
            if node not in self._live | self._given_up | self._proven:
                self._waiting.setdefault(node, now)

    def unserved(self, node: str) -> None:
        """The kernel released the node: its residual has no logger."""
        with self._lock:
            self._waiting.pop(node, None)

    def opened(self, node: str, now: float) -> bool:
        """The node's first stream is accepted; True: ownership changes (republish)."""
        with self._lock:
            self._closing.pop(node, None)  # a reconnect within the grace
            self._waiting.pop(node, None)
            self._proven.add(node)
            if node in self._live:
                return False
            self._live.add(node)
            return True

    def closed(self, node: str, now: float) -> None:
        """The node's last stream ended: ownership goes back after the grace."""
        with self._lock:
            if node in self._live:
                self._closing[node] = now + self.grace_s

    def due(self, now: float) -> tuple[list[str], list[str]]:
        """(nodes whose grace ended now: no longer live, nodes given up now):
        republish both."""
        with self._lock:
            gone = [n for n, end in self._closing.items() if now >= end]
            for n in gone:
                del self._closing[n]
                self._live.discard(n)
            quiet = [n for n, t in self._waiting.items() if now - t >= self.give_up_s]
            for n in quiet:
                del self._waiting[n]
                self._given_up.add(n)
            return gone, quiet

    def debug(self, now: float) -> dict[str, object]:
        """/debug/fastpath `outlier_access_log`."""
        with self._lock:
            return {"live": sorted(self._live), "given_up": sorted(self._given_up),
                    "waiting_s": {n: round(now - t, 2) for n, t in sorted(self._waiting.items())},
                    "grace_left_s": {n: round(max(0.0, end - now), 2)
                                     for n, end in sorted(self._closing.items())}}
