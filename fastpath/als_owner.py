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
cost Envoy would pay for nothing. Envoy opens the stream at its first
logged attempt only, so a node whose Envoy's path sends no request to an
owned cluster in that time is given up too (Envoy's detector then keeps
Envoy's path, as before the kernel took it).

Giving up is not for good: a sidecar that started late, or whose stream
comes back after a network hiccup, would otherwise never hand its detector
to the kernel again. After RETRY_FIRST_S (doubling at each give-up, at most
RETRY_MAX_S) the logger is offered again (`due`'s third list: republish):
the node waits GIVE_UP_S again, an accepted stream then makes it proven as
any other, and none gives it up again with the next, doubled, backoff. So a
node that never logs costs two pushes (logger on, logger off) per backoff
step: 60 s, 120 s, 240 s, 480 s, then every 600 s; never one per tick.

Giving ownership back costs a CDS push of every owned cluster
(outlier_detection back on: Envoy rebuilds the cluster and drains its
connection pools) and the EDS marks go; taking it again costs the same.
"""

from __future__ import annotations

import threading

GRACE_S = 5.0  # a closed last stream gives Envoy its detector back after this
GIVE_UP_S = 30.0  # a logger served this long without an accepted stream: dropped
RETRY_FIRST_S = 60.0  # a given-up node is offered the logger again after this,
RETRY_MAX_S = 600.0  # doubling at each give-up, up to this


class AlsOwner:
    """Per node: live (an accepted stream open, or closed less than GRACE_S ago)."""

    def __init__(self, grace_s: float = GRACE_S, give_up_s: float = GIVE_UP_S,
                 retry_s: tuple[float, float] = (RETRY_FIRST_S, RETRY_MAX_S)) -> None:
        self.grace_s, self.give_up_s = grace_s, give_up_s
        self.retry_first_s, self.retry_max_s = retry_s
        self._live: set[str] = set()
        self._closing: dict[str, float] = {}  # node -> when its grace ends
        self._waiting: dict[str, float] = {}  # node -> when its logger was first served
        self._served: set[str] = set()  # the kernel owns it with the logger in its residual
        self._given_up: dict[str, float] = {}  # node -> when the logger is offered again
        self._backoff: dict[str, float] = {}  # node -> its next give-up's backoff
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
            self._served.add(node)
            if node not in self._live | self._given_up.keys() | self._proven:
                self._waiting.setdefault(node, now)

    def unserved(self, node: str) -> None:
        """The kernel released the node: its residual has no logger."""
        with self._lock:
            self._served.discard(node)
            self._waiting.pop(node, None)

    def opened(self, node: str, now: float) -> bool:
        """The node's first stream is accepted; True: ownership changes (republish)."""
        with self._lock:
            self._closing.pop(node, None)  # a reconnect within the grace
            self._waiting.pop(node, None)
            self._given_up.pop(node, None)  # a stream of a logger it still had
            self._backoff.pop(node, None)
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

    def due(self, now: float) -> tuple[list[str], list[str], list[str]]:
        """(nodes whose grace ended now: no longer live, nodes given up now,
        nodes offered the logger again now): republish all three."""
        with self._lock:
            gone = [n for n, end in self._closing.items() if now >= end]
            for n in gone:
                del self._closing[n]
                self._live.discard(n)
            quiet = [n for n, t in self._waiting.items() if now - t >= self.give_up_s]
            for n in quiet:
                del self._waiting[n]
                wait = self._backoff.get(n, self.retry_first_s)
                self._given_up[n] = now + wait
                self._backoff[n] = min(wait * 2, self.retry_max_s)
            again = [n for n, t in self._given_up.items() if now >= t]
            for n in again:
                del self._given_up[n]
                if n in self._served:  # else `served` starts the wait at the next claim
                    self._waiting[n] = now
            return gone, quiet, again

    def retry_in(self, node: str, now: float) -> float:
        """Seconds until a given-up node is offered the logger again (0: not given up)."""
        return max(0.0, self._given_up.get(node, now) - now)

    def debug(self, now: float) -> dict[str, object]:
        """/debug/fastpath `outlier_access_log`."""
        with self._lock:
            return {"live": sorted(self._live), "given_up": sorted(self._given_up),
                    "retry_in_s": {n: round(t - now, 2) for n, t in sorted(self._given_up.items())},
                    "waiting_s": {n: round(now - t, 2) for n, t in sorted(self._waiting.items())},
                    "grace_left_s": {n: round(max(0.0, end - now), 2)
                                     for n, end in sorted(self._closing.items())}}
