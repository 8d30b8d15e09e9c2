"""An upstream app that closes (or dies) before answering: the agent half.

Owner: NAME=reset (K2 agent). One `Resetter` per node datapath, owned by
`fastpath.agent_node.NodeDatapath`; its `claim(up)` runs on the agent's event
thread from the pools' look at readable upstream sockets (`Pools.claim`, after
the retry and fault-delay agents: a diverted response or a held request is
data, not an EOF). The kernel half is bpf_src/dp_reset.h: dp_peer[U].wait is
1 from the FORWARD of a request on U until its first response byte.

What Envoy 1.40 does (seen with the real binary, tests/kernel_datapath/test_reset.py):
the upstream connection closes (FIN, or RST) after the request went out and
before any response byte: `503`, `content-type: text/plain`, body
`upstream connect error or disconnect/reset before headers. reset reason:
connection termination`, and the client's connection stays open (its next
request is served). The agent does the same when U turns readable at EOF with
the bit set: it takes U off every way (no byte of U reaches the client any
more), writes Envoy's 503 into the client's receive queue through its
injector socket (bpf_src/dp_inject.c, slot 3) and lets the pools close U. The
client's next request finds U gone and goes to Envoy, as after a timeout.

In the mesh (paired upstreams) the destination has an inbound sidecar, which
the kernel bypasses: there the app's close is answered by that sidecar with
the same 503 as a *response*, and the client's sidecar applies its route's
retry policy to it (seen: istiod's default policy, `retriable-status-codes`
503, made three attempts). So when U's request is armed for a kernel retry
(dp_retry.h, paired only) whose policy retries a 503, the agent hands it to
the retry agent as a diverted 503 (`retry`, fastpath.agent_retry: backoff,
previous_hosts, one route deadline) instead of answering; the last attempt's
close is answered 503.

Exactly one side answers: on a timed route the route timer (fastpath.timeouts)
may fire at the same moment, so the agent first claims the request with the
same `dp_tmo_armed` delete the timer and the kernel race on (lost: the timer
answered 504, nothing more); on an untimed route nothing else answers a
request whose response never started, and the event thread is the only
reader of the bit.
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
from collections.abc import Callable
from typing import Any

from fastpath import bpfsys
from fastpath.timeouts import DP_TMO_STARTED, LazyInjector, reset_reply

log = logging.getLogger(__name__)

INJECTOR_SLOT = 3  # dp_inj: 0 route timeouts, 1 fault delays, 2 redirects
RESET_STATUS = 503  # the destination's inbound sidecar's answer to a reset
RS_ARMED, RS_DIVERT = 1, 2  # dp_retry.h DP_RS_*
TMO_WAIT = 2  # dp_timeout.h DP_TMO_WAIT
CLUSTER_SLOTS = 256  # DP_RETRY_CLUSTERS


class PeerVal(ct.Structure):
    """struct dp_peer_val (datapath.h): dp_peer's value."""

    _fields_ = [("client", ct.c_uint64), ("wait", ct.c_uint32), ("left", ct.c_uint32),
                ("od_host", ct.c_uint32),  # outlier host slot + 1 (dp_outlier.h)
                ("_pad", ct.c_uint32)]


def action(peer: Any | None, timed: Any | None) -> str:
    """What a close of U's app means, from U's dp_peer value and its dp_tmo
    record (None when absent). Pure: the unit tests call it with plain objects.

    "none": no request waits on U (idle, or its response started: the client
    reads what came; the route timer, if any, acts on a stalled one);
    "claim": a timed request: claim it from the timer first; "reset": answer 503."""
    if peer is None or not int(peer.wait):
        return "none"
    if timed is None:
        return "reset"
    return "none" if int(timed.state) == DP_TMO_STARTED else "claim"


def retries_reset(rec: Any | None, busy: int, any_status: bool = False) -> bool:
    """True when U's kernel retry record (struct dp_retry, None: no retry route)
    retries the inbound sidecar's 503 for a reset, as dp_retry_response would
    divert a 503 response: armed, retries left, 503 among the policy's codes,
    fewer than the cluster's max_retries pending (`busy`). `any_status`: no
    status check (a per-try timeout the policy retries)."""
    if rec is None or int(rec.state) != RS_ARMED or not int(rec.left):
        return False
    if any_status:
        return busy < int(rec.pol.max_retries)
    codes = [int(rec.pol.codes[i]) for i in range(int(rec.pol.n_codes))]
    hit = RESET_STATUS in codes or RESET_STATUS // 100 in codes  # 5: retry_on 5xx
    return hit and busy < int(rec.pol.max_retries)


class Resetter:
    """Answers Envoy's 503 for requests whose upstream closed before answering."""

    def __init__(self, dp: Any, retry: Callable[[int], bool] | None = None,
                 retries_timeouts: Callable[[int, int], bool] | None = None) -> None:
        """`retry(up)`: the retry agent's claim of a diverted response on `up`;
        `retries_timeouts(gen, route)`: that route's policy retries a per-try
        timeout (Retrier.retries_timeouts)."""
        self.dp = dp
        self.retry = retry
        self.retries_timeouts = retries_timeouts
        self._timed_out: list[int] = []  # attempts the timer handed over (event thread: retry)
        self._lock = threading.Lock()
        self.injector = LazyInjector(dp, slot=INJECTOR_SLOT)
        self.counts = {"reset_503": 0, "reset_retried": 0, "reset_raced": 0,
                       "reset_client_gone": 0}
        # fastpath.agent_outlier.OutlierKeeper.count_error (set by agent_node): the
        # close counts for U's host as the destination sidecar's 503 would
        self.on_error: Callable[[int, int], None] | None = None

    def claim(self, up: int) -> bool:
        """`up` is readable at EOF (pools' look): answer its client if a request
        waits on it. True when the retry agent took the request (U is its to
        read), else False: the socket stays the pools' to close."""
        peer = bpfsys.table_get(self.dp.bpf["dp_peer"], up)
        what = action(peer, bpfsys.table_get(self.dp.bpf["dp_tmo"], up))
        if what == "none" or peer is None:
            return False
        client = int(peer.client)
        if self.on_error is not None:
            self.on_error(up, RESET_STATUS)
        if self.retry is not None and self._divert(up):
            self.dp.take_upstream(up)  # the client gets the retry's answer, never U's
            self.counts["reset_retried"] += 1
            return self.retry(up)
        key = ct.c_uint64(up)
        if what == "claim":
            if not bpfsys.map_delete(self.dp.fds["dp_tmo_armed"], key):
                self.counts["reset_raced"] += 1  # the timer answered 504 first
                return False
            bpfsys.map_delete(self.dp.fds["dp_tmo"], key)
        self.dp.take_upstream(up)  # nothing of U reaches the client any more
        if self._inject(client, reset_reply()):
            self.counts["reset_503"] += 1
            log.debug("reset: upstream %d closed before answering client %d: 503", up, client)
        else:
            self.counts["reset_client_gone"] += 1
        return False

    def per_try_expired(self, up: int) -> bool:
        """Timer thread (TimeoutKeeper), which claimed the request on `up` at its
        per-try deadline: True when its route's policy retries a per-try timeout
        (5xx, gateway-error, reset: Envoy resets the attempt and retries). The
        attempt is then diverted for the retry agent like a 504, the claim given
        back (the retry claims it again; the route timer may still answer at the
        route deadline), U taken off every way, and U queued for `timed_out()`."""
        t = self.dp.bpf["dp_retry"]
        rec = bpfsys.table_get(t, up)
        if rec is None or self.retries_timeouts is None or \
                not self.retries_timeouts(int(rec.gen), int(rec.route)):
            return False
        if not self._mark_diverted(up, rec, 504, lambda r, busy: retries_reset(r, busy, any_status=True)):
            return False
        bpfsys.map_update(self.dp.fds["dp_tmo_armed"], ct.c_uint64(up), ct.c_uint32(1))
        self.dp.take_upstream(up)  # the attempt's late response never reaches the client
        with self._lock:
            self._timed_out.append(up)
        return True

    def timed_out(self) -> list[int]:
        """Attempts handed over by the timer since the last call (event thread)."""
        with self._lock:
            out, self._timed_out = self._timed_out, []
        return out

    def _divert(self, up: int) -> bool:
        """Mark U's armed retry record diverted with a 503, as dp_retry_response
        does for a 503 response (breaker count taken, the attempt's per-try
        timer over, the route deadline kept: dp_tmo_retrying). False when the
        policy does not retry it (then the client gets the 503)."""
        rec = bpfsys.table_get(self.dp.bpf["dp_retry"], up)
        if rec is None:
            return False  # not a kernel retry route
        return self._mark_diverted(up, rec, RESET_STATUS, retries_reset)

    def _mark_diverted(self, up: int, rec: Any, status: int,
                       wanted: Callable[[Any, int], bool]) -> bool:
        """dp_retry[U] diverted with `status` if `wanted(rec, busy)`, the
        breaker count taken, the attempt's per-try timer over (the route
        deadline kept, as dp_tmo_retrying does)."""
        busy_t = self.dp.bpf["dp_retry_busy"]
        slot = busy_t.Key(int(rec.cluster) & (CLUSTER_SLOTS - 1))
        busy = int(busy_t[slot].value)
        if not wanted(rec, busy):
            return False
        busy_t[slot] = busy_t.Leaf(busy + 1)  # the retry agent gives it back when it re-sends
        rec.state, rec.status = RS_DIVERT, status
        t = self.dp.bpf["dp_retry"]
        t[t.Key(up)] = rec
        tmo_t = self.dp.bpf["dp_tmo"]
        tmo = bpfsys.table_get(tmo_t, up)
        if tmo is not None and int(tmo.state) == TMO_WAIT:
            tmo.deadline_ns = tmo.global_ns
            tmo_t[tmo_t.Key(up)] = tmo
        return True

    def _inject(self, client: int, data: bytes) -> bool:
        return self.injector.send(client, data)

    def close(self) -> None:
        self.injector.close()
