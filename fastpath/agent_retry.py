"""The agent's half of the data path's retries (the kernel half: bpf_src/dp_retry.h).

Owner: the retry part of K2. One `Retrier` per node datapath, driven from the
agent's thread only (`fastpath.agent_node`): `program()` at each plan apply,
`on_diverted()` for a DP_EV_RETRY event, `claim()` when an upstream socket is
readable, `service()` every loop turn, `on_close()` when a client closes.

An upstream U whose response the kernel diverted holds that response in its
receive queue: the Retrier reads it to its end (`fastpath.retry.response_end`),
drops it, waits Envoy's jittered backoff, and re-sends the request copy the
kernel kept, with the attempt count + 1 and one retry less, armed again, on the
endpoint the previous_hosts rule picks: U itself, or a free upstream of another
endpoint of the same cluster, bound to the client (dp_peer) until the client
closes. It owns only those extra bindings; the pools own the sockets.
"""

from __future__ import annotations

import ctypes as ct
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath import bpfsys, deadline
from fastpath.agent_close import wait_value
from fastpath.agent_reset import PeerVal
from fastpath.classify_route import RESET_RETRY_ON
from fastpath.loader import drop_generation
from fastpath.plan import ClusterAction, KernelPlan, RetryPolicy, Verdict
from fastpath.retry import (
    Backoff,
    FramingError,
    choose_pool,
    request_method,
    response_end,
    rpol_fields,
    with_attempt_count,
)

log = logging.getLogger(__name__)

RS_IDLE, RS_ARMED, RS_DIVERT = 0, 1, 2  # dp_retry.h DP_RS_*
CLUSTER_SLOTS = 256  # DP_RETRY_CLUSTERS
MAX_RESPONSE = 1 << 20  # a diverted response larger than this is dropped as it comes


def needs_retry(plan: KernelPlan) -> bool:
    """True when a KERNEL route of `plan` has a retry policy: the node's program
    is then compiled with -DDP_RETRY=1."""
    return any(isinstance(r.action, ClusterAction) and r.action.retry is not None
               and r.verdict is Verdict.KERNEL
               for lst in plan.listeners for vh in lst.virtual_hosts for r in vh.routes)


@dataclass
class Attempts:
    """One client request across its attempts."""

    backoff: Backoff
    tried: list[int] = field(default_factory=list)  # pools


@dataclass
class Job:
    """A diverted response being read, then the retry waiting for its backoff."""

    up: int
    client: int
    rec: Any  # the kernel's struct dp_retry at divert time
    method: str
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    due: float | None = None  # monotonic time of the re-send, once the response is read
    close: bool = False  # U is closed once the retry went out (a per-try timeout's)


class Retrier:
    def __init__(self, dp: Any, pools: Any, rng: random.Random | None = None) -> None:
        self.dp = dp
        self.pools = pools
        self.rng = rng or random.Random()
        self.jobs: dict[int, Job] = {}  # U cookie -> job
        self.requests: dict[int, Attempts] = {}  # client cookie -> its request's attempts
        self.extra: dict[int, list[int]] = {}  # client cookie -> upstreams bound by retries
        # a retry with no upstream left: (client, request) to Envoy (agent_lost.Handoff)
        self.on_lost: Callable[[int, bytes], bool] | None = None  # True: handed over
        self.policies: dict[tuple[int, int], RetryPolicy] = {}  # (gen, route id + 1)
        self.cluster_pools: dict[tuple[int, int], list[int]] = {}  # (gen, cluster id) -> pools
        # (gen, route id + 1) -> (route timeout ms, per-try timeout ms) of timed retry routes
        self.timers: dict[tuple[int, int], tuple[int, int]] = {}
        self.stats: Counter[str] = Counter()
        # fastpath.agent_outlier.OutlierKeeper (set by agent_node): a retry skips
        # ejected hosts, as Envoy's LB does, and its response is counted
        self.outlier: Any = None

    # ---- plan (agent_synth.program) ------------------------------------------
    def program(self, plan: KernelPlan, sp: Any, gen: int,
                cluster_pools: dict[int, list[int]]) -> None:
        """Write generation `gen` of dp_rpol from the plan's KERNEL routes."""
        t = self.dp.bpf["dp_rpol"]
        drop_generation(t, gen)
        self.policies = {k: v for k, v in self.policies.items() if k[0] != gen}
        self.cluster_pools = {k: v for k, v in self.cluster_pools.items() if k[0] != gen}
        self.timers = {k: v for k, v in self.timers.items() if k[0] != gen}
        for cid, pools in cluster_pools.items():
            self.cluster_pools[(gen, cid)] = list(pools)
        for rid, r in enumerate(getattr(sp, "routes", ())):
            if r is None or r.verdict is not Verdict.KERNEL or not isinstance(r.action, ClusterAction):
                continue
            pol = r.action.retry
            if pol is None:
                continue
            limits = [c.max_retries for wc in r.action.clusters if (c := plan.cluster(wc.name))]
            f = rpol_fields(pol, min(limits) if limits else 3)
            leaf = t.Leaf()
            leaf.num_retries, leaf.grpc_mask = f.num_retries, f.grpc_mask
            leaf.n_codes, leaf.max_retries = f.n_codes, f.max_retries
            for i, code in enumerate(f.codes):
                leaf.codes[i] = code
            t[t.Key(gen=gen, route=rid + 1)] = leaf
            self.policies[(gen, rid + 1)] = pol
            timers = (r.action.timeout_ms or 0, pol.per_try_timeout_ms or 0)
            if any(timers):
                self.timers[(gen, rid + 1)] = timers

    def per_try(self, gen: int) -> dict[int, int]:
        """Generation `gen`'s per-try timeouts: route id + 1 -> ms (for dp_rto)."""
        return {rid: tr for (g, rid), (_, tr) in self.timers.items() if g == gen and tr}

    # ---- events ---------------------------------------------------------------
    def on_diverted(self, up: int, client: int) -> None:
        """DP_EV_RETRY: the response on `up` is being diverted to us."""
        if up not in self.jobs:
            self._start(up)
        self._read(up)

    def claim(self, up: int) -> bool:
        """`up` is readable: True when it is (or becomes) ours to read."""
        if up not in self.jobs and not self._start(up):
            return False
        self._read(up)
        return True

    def retries_timeouts(self, gen: int, route: int) -> bool:
        """Route (gen, route id + 1)'s policy retries a per-try timeout (Envoy: a
        local reset, retried under 5xx, gateway-error, reset). Any thread."""
        pol = self.policies.get((gen, route))
        return pol is not None and bool(set(pol.retry_on) & RESET_RETRY_ON)

    def on_per_try(self, up: int) -> None:
        """The timer thread reset the attempt on `up` at its per-try timeout and
        diverted it (fastpath.agent_reset): retry without reading U (the app's
        late answer is not awaited); U is closed once the retry went out."""
        if up not in self.jobs and not self._start(up):
            return
        job = self.jobs[up]
        job.eof = job.close = True
        if job.due is None:
            self._maybe_done(job, False)

    def on_close(self, client: int, ups: list[int]) -> list[int]:
        """A client closed: forget its request; returns the upstreams bound by
        retries (the caller releases them with the bound ones)."""
        self.requests.pop(client, None)
        for up in [u for u, j in self.jobs.items() if j.client == client]:
            self._cancel(self.jobs.pop(up), "client closed")
        extra = self.extra.pop(client, [])
        for up in ups + extra:
            self._delete_record(up)
        return extra

    # ---- the loop (agent thread) -----------------------------------------------
    def wait_ms(self) -> int | None:
        """Milliseconds to the next due re-send, or None."""
        dues = [j.due for j in self.jobs.values() if j.due is not None]
        if not dues:
            return None
        return max(0, int((min(dues) - time.monotonic()) * 1000))

    def service(self) -> None:
        now = time.monotonic()
        for up, job in list(self.jobs.items()):
            if job.due is None:
                self._read(up)
            elif job.due <= now:
                del self.jobs[up]
                self._resend(job)
                if job.close:  # Envoy closed the timed-out attempt's connection
                    self.pools.release([job.up])

    # ---- internals ---------------------------------------------------------------
    def _record(self, up: int) -> Any | None:
        return bpfsys.table_get(self.dp.bpf["dp_retry"], up)

    def _delete_record(self, up: int) -> None:
        bpfsys.table_delete(self.dp.bpf["dp_retry"], up)

    def _start(self, up: int) -> bool:
        rec = self._record(up)
        if rec is None or rec.state != RS_DIVERT:
            return False
        req = bytes(rec.req[:rec.len])
        job = Job(up, int(rec.client), rec, request_method(req))
        self.jobs[up] = job
        log.debug("retry: diverted on %d (client %d, attempt %d, status %d)", up, job.client,
                  rec.attempt, rec.status)
        if rec.attempt == 1 or job.client not in self.requests:
            pol = self.policies.get((int(rec.gen), int(rec.route)))
            base, top = (pol.base_ms, pol.max_ms) if pol else (25, 250)
            self.requests[job.client] = Attempts(Backoff(base, top, self.rng), [int(rec.pool)])
        self.stats["diverted"] += 1
        return True

    def _sock(self, up: int) -> socket.socket | None:
        pid = self.pools.owner.get(up)
        pool = self.pools.pools.get(pid) if pid is not None else None
        return pool.socks.get(up) if pool is not None else None

    def _read(self, up: int) -> None:
        job = self.jobs.get(up)
        s = self._sock(up)
        if job is None or job.due is not None:
            return
        while s is not None and not job.eof:
            try:
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                job.eof = True
                break
            if len(job.buf) < MAX_RESPONSE:
                job.buf += chunk
        log.debug("retry: %d: %d bytes read (eof %s, socket %s)", up, len(job.buf), job.eof,
                  s is not None)
        self._maybe_done(job, s is None)

    def _maybe_done(self, job: Job, gone: bool) -> None:
        try:
            end = response_end(bytes(job.buf), job.method)
        except FramingError as exc:
            log.warning("retry: diverted response on %d not delimited (%s): dropped", job.up, exc)
            end = len(job.buf)
        if end is None and not (job.eof or gone):
            return
        self._set_state(job.up, RS_IDLE)  # U's next response goes to its client again
        attempts = self.requests.get(job.client)
        if attempts is None:
            self.jobs.pop(job.up, None)
            self._cancel(job, "client gone while reading")
            return
        job.due = time.monotonic() + attempts.backoff.next() / 1000.0

    def _set_state(self, up: int, state: int) -> None:
        t = self.dp.bpf["dp_retry"]
        rec = self._record(up)
        if rec is not None:
            rec.state = state
            t[t.Key(up)] = rec

    def _busy_done(self, rec: Any) -> None:
        """The pending retry is sent (or dropped): the breaker count goes back."""
        t = self.dp.bpf["dp_retry_busy"]
        slot = t.Key(int(rec.cluster) & (CLUSTER_SLOTS - 1))
        v = t[slot]
        if v.value > 0:
            v.value -= 1
            t[slot] = v

    def _cancel(self, job: Job, why: str) -> None:
        self._busy_done(job.rec)
        self.stats["cancelled"] += 1
        log.info("retry: client %d's retry dropped: %s", job.client, why)

    def _resend(self, job: Job) -> None:
        rec = job.rec
        self._busy_done(rec)
        attempts = self.requests.get(job.client)
        if attempts is None:
            self.stats["cancelled"] += 1
            log.info("retry: client %d's retry dropped: client gone in backoff", job.client)
            return
        # a record without a timer in the plan: a plan swap since the divert
        had, tmo = deadline.claim(self.dp, job.up)
        if tmo is None and (had or (int(rec.gen), int(rec.route)) in self.timers):
            # the route deadline passed (the 504 went out): Envoy retries no more
            self.stats["deadline"] += 1
            log.info("retry: client %d's retry dropped: route timeout", job.client)
            return
        target = self._target(job, attempts)
        if target is None:
            self.stats["no_upstream"] += 1
            if self.on_lost is not None and self.on_lost(job.client, bytes(rec.req[:rec.len])):
                return  # to Envoy (fastpath/agent_lost.py): the client gets its answer
            if tmo is not None:
                deadline.unclaim(self.dp, job.up)  # the timer still answers at the deadline
            log.warning("retry: no upstream for client %d's retry: request lost", job.client)
            return
        up, pool, sock = target
        attempts.tried.append(pool)
        req = with_attempt_count(bytes(rec.req[:rec.len]), int(rec.attempt) + 1)
        if tmo is not None:
            now = time.monotonic_ns()  # CLOCK_MONOTONIC, bpf_ktime_get_ns's clock
            req = deadline.with_expected_timeout(req, deadline.expected_timeout_ms(
                int(tmo.timeout_ms), int(tmo.try_ms), int(tmo.global_ns), now))
            deadline.rearm(self.dp, job.up, up, tmo, now)
        armed = type(rec)()
        ct.memmove(ct.addressof(armed), ct.addressof(rec), ct.sizeof(rec))
        armed.state, armed.left, armed.attempt = RS_ARMED, rec.left - 1, rec.attempt + 1
        armed.pool, armed.len = pool, len(req)
        ct.memmove(armed.req, req, len(req))
        t = self.dp.bpf["dp_retry"]
        t[t.Key(up)] = armed  # armed before the request leaves: its response is checked
        gen, cid = int(rec.gen), int(rec.cluster)
        if up != job.up:
            # waiting for its first response byte: a close of its app is a reset;
            # the attempt's response counts for its host (outlier detection)
            od = self.outlier.attempt(gen, cid, pool) if self.outlier is not None else 0
            bpfsys.map_update(self.dp.fds["dp_peer"], ct.c_uint64(up),
                              PeerVal(job.client, wait_value(req), od_host=od))
            self.extra.setdefault(job.client, []).append(up)
        elif self.outlier is not None:  # the attempt's response counts for its host
            self.outlier.mark(up, gen, cid, pool)
        try:
            sock.setblocking(True)
            sock.sendall(req)
        except OSError as exc:
            self.stats["send_failed"] += 1
            log.warning("retry: re-send on upstream %d failed: %s", up, exc)
        finally:
            sock.setblocking(False)
        self.stats["retried"] += 1

    def _target(self, job: Job, attempts: Attempts) -> tuple[int, int, socket.socket] | None:
        """(upstream cookie, pool, socket) of the retry: previous_hosts picks the pool."""
        rec = job.rec
        pol = self.policies.get((int(rec.gen), int(rec.route)))
        pools = self.cluster_pools.get((int(rec.gen), int(rec.cluster)), [int(rec.pool)])
        if self.outlier is not None:
            pools = self.outlier.healthy_pools(int(rec.gen), int(rec.cluster), pools)
        pick = choose_pool(pools, attempts.tried, bool(pol and pol.previous_hosts),
                           pol.host_selection_attempts if pol else 1, self.rng)
        order = [pick] + [p for p in pools if p != pick] if pick is not None else list(pools)
        for pool in order:
            if pool == int(rec.pool):
                s = self._sock(job.up)
                if s is not None and not job.eof:
                    return job.up, pool, s
            got = self._pop_free(pool)
            if got is not None:
                return got[0], pool, got[1]
        return None

    def _pop_free(self, pool: int) -> tuple[int, socket.socket] | None:
        """A free upstream of `pool` taken from the kernel's queue (as sk_msg would)."""
        if pool not in self.dp.pool_maps:
            return None
        for _ in range(8):
            cookie = self.dp.pop_free(pool)
            if cookie is None:
                return None
            s = self._sock(cookie)
            if s is not None:
                return cookie, s
        return None

    def debug(self) -> dict[str, Any]:
        return {"pending": len(self.jobs), "extra_bindings": sum(map(len, self.extra.values())),
                **self.stats}
