"""Per-endpoint pools of upstream connections for the fast path.

Owner: K2. Driven by `fastpath.agent_node` (one `Pools` per node datapath).
Each pool is one endpoint (address, port) of one cluster; its free sockets sit
in the kernel queue `dp_free[pool]`, where sk_msg pops one and binds it to a
client connection for the connection's life. When the client closes, sock_ops
reports the bound sockets and the pool closes them (a response may still be
in flight on them). Sockets an upstream closes are noticed (EOF) and replaced.
The agent reads an upstream socket only when the kernel diverted a response
into it for a retry (`claim`, fastpath.agent_retry); otherwise the kernel takes
every byte.

Threads: the agent's thread calls `look()` (accounting and sizing, fast),
`release()`, `ensure()`/`retire()` and `snapshot()`; one refill thread per
`Pools` (`start()`) makes the sockets in the background, so a batch of
connects and pairings never delays the agent's event loop. One lock guards
the pools' bookkeeping; sockets are made outside it. Sizes come from demand
(`fastpath.pool_sizing`).

Endpoints inside a pod's network namespace are reached from inside that
namespace on loopback, which bypasses the destination's inbound interception
(the kernel then enforces that pod's inbound policy, DESIGN.md rule 4).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath.pool_sizing import MAX_DEPTH, MIN_DEPTH, SHRINK_AFTER_S, Demand

log = logging.getLogger(__name__)

__all__ = ["MAX_DEPTH", "MIN_DEPTH", "SHRINK_AFTER_S", "EndpointKey", "Pool", "Pools",
           "connect_in_netns", "enter_netns", "NetnsSwitch"]

CLONE_NEWNET = 0x40000000
MAX_TOTAL = 3072  # upstream sockets of one node: below dp_up's DP_MAX_UP (4096)
BATCH = 32  # sockets made before they are offered: the first ones are ready sooner
# A connect on loopback completes at once unless the app's accept queue is full
# (the SYN is dropped and only retried after 1 s): give up quickly then, and
# pause that pool, rather than block the refill of every pool for a second.
LOOPBACK_CONNECT_TIMEOUT_S = 0.05
CONGESTED_PAUSE_S = 0.1


@dataclass(frozen=True)
class EndpointKey:
    """Where a pool connects: address:port, from inside netns (a path) or here."""

    address: str
    port: int
    netns: str | None = None


@dataclass
class Pool:
    pool_id: int
    key: EndpointKey
    target: int = MIN_DEPTH  # free sockets wanted; sized from demand
    socks: dict[int, socket.socket] = field(default_factory=dict)  # cookie -> socket
    free: set[int] = field(default_factory=set)  # cookies offered to the kernel queue
    failures: int = 0
    misses: int = 0  # last seen value of the kernel's dp_pool_miss counter
    demand: Demand = field(default_factory=Demand)
    taken: int = 0  # free sockets bound (and maybe released) since the last look
    retired: bool = False
    pause_until: float = 0.0  # the endpoint's accept queue looked full: wait a little


def enter_netns(netns: str) -> None:
    """This thread into the network namespace `netns` (setns acts on the calling
    thread); OSError with the errno when the kernel refuses. For short-lived
    threads: NetnsSwitch keeps the fds of a thread that switches often."""
    libc = ct.CDLL(None, use_errno=True)
    fd = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ct.get_errno()
            raise OSError(e, f"setns {netns}: {os.strerror(e)}")
    finally:
        os.close(fd)


class NetnsSwitch:
    """Moves the *calling* thread into a network namespace (setns acts per
    thread). Used by the refill thread only; it keeps the namespace fds open."""

    def __init__(self) -> None:
        self.libc = ct.CDLL(None, use_errno=True)
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.fds: dict[str, int] = {}
        self.current: str | None = None

    def enter(self, netns: str | None) -> None:
        if netns == self.current:
            return
        if netns is None:
            fd = self.home
        elif (fd := self.fds.get(netns, -1)) < 0:
            fd = self.fds[netns] = os.open(netns, os.O_RDONLY)
        if self.libc.setns(fd, CLONE_NEWNET) != 0:
            e = ct.get_errno()
            raise OSError(e, f"setns {netns or 'home'}: {os.strerror(e)}")
        self.current = netns

    def close(self) -> None:
        for fd in (self.home, *self.fds.values()):
            os.close(fd)
        self.fds.clear()


def make_sockets(address: str, port: int, n: int, timeout: float = 1.0,
                 announce: Callable[[socket.socket], object] | None = None,
                 withdraw: Callable[[socket.socket], object] | None = None
                 ) -> list[socket.socket]:
    """`n` TCP connections to address:port from the calling thread's netns.
    `announce(sock)` runs after bind and before connect (pairing), `withdraw(sock)`
    when that connect fails. Raises the first error only when no socket could
    be made."""
    out: list[socket.socket] = []
    for _ in range(n):
        s = socket.socket()
        announced = False
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(timeout)
            if announce is not None:
                # pairing needs the local port before connect; without it let
                # connect pick one: a bind(0) takes the port a test or a process
                # just found free with bind(0) and is about to listen on
                s.bind((address if address.startswith("127.") else "0.0.0.0", 0))
                announce(s)
                announced = True
            s.connect((address, port))
        except OSError:
            if announced and withdraw is not None:
                withdraw(s)
            s.close()
            if not out:
                raise
            break
        out.append(s)
    return out


def connect_in_netns(netns: str | None, address: str, port: int, n: int,
                     timeout: float = 1.0,
                     announce: Callable[[socket.socket], object] | None = None
                     ) -> list[socket.socket]:
    """`make_sockets` inside the network namespace file `netns` (None: this
    one), from a short-lived thread so the caller's namespace never changes."""
    out: list[socket.socket] = []
    err: list[BaseException] = []

    def work() -> None:
        try:
            sw = NetnsSwitch()
            try:
                sw.enter(netns)
                out.extend(make_sockets(address, port, n, timeout, announce))
            finally:
                sw.close()
        except BaseException as exc:  # reported to the caller's thread
            err.append(exc)

    t = threading.Thread(target=work, name="l7fp-pool-connect", daemon=True)
    t.start()
    t.join(timeout * (n + 1) + 1)
    if err and not out:
        raise err[0]
    return out


class Pools:
    """All upstream pools of one node datapath (`fastpath.loader.Datapath`).

    `connect(netns, address, port, n, announce=...)` makes sockets; by default
    the refill thread enters `netns` itself (`NetnsSwitch`), which is cheap
    and needs no thread per batch."""

    def __init__(self, dp: Any, connect: Callable[..., list[socket.socket]] | None = None,
                 pairing: bool = True) -> None:
        self.dp = dp
        self.pairing = pairing
        self.unpaired = 0  # upstreams whose app end could not be paired (TCP way)
        self.connect = connect
        self.pools: dict[int, Pool] = {}
        self.by_key: dict[EndpointKey, int] = {}
        # pooled sockets: the kernel takes their data, so readable means EOF/error,
        # a diverted/held message (claim), or a spurious wake-up (`_woke_empty`)
        self.ep = select.epoll()
        self.fd_cookie: dict[int, int] = {}
        self.owner: dict[int, int] = {}  # cookie -> pool id
        # readable upstreams are offered here first: a response the kernel diverted
        # for a retry (fastpath.agent_retry) or a held request is data, not an EOF
        self.claim: Callable[[int], bool] | None = None
        # then, still readable, at EOF: the reset and close agents (True: kept)
        self.claim_eof: Callable[[int], bool] | None = None
        self.mu = threading.RLock()
        self.wake = threading.Event()
        self.idle = threading.Event()  # set while the refill thread has nothing to do
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._switch: NetnsSwitch | None = None
        self.timing: dict[str, float] = {"refills": 0, "made": 0, "refill_s": 0.0,
                                         "refill_max_s": 0.0}

    # ---- configuration (agent thread) ---------------------------------------
    def start(self) -> None:
        """Start the refill thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill_loop, name="l7fp-pool-refill",
                                            daemon=True)
            self._thread.start()

    def ensure(self, key: EndpointKey) -> int:
        """The pool id of endpoint `key`, created (empty) on first use."""
        with self.mu:
            pid = self.by_key.get(key)
            if pid is None:
                pid = next(i for i in range(len(self.pools) + 1) if i not in self.pools)
                self.pools[pid] = Pool(pid, key)
                self.by_key[key] = pid
                self.dp.ensure_pool(pid, MAX_DEPTH)
            self.wake.set()
            return pid

    def retire(self, keep: set[EndpointKey]) -> None:
        """Close the pools of endpoints no longer in any plan (or unhealthy)."""
        with self.mu:
            for key in [k for k in self.by_key if k not in keep]:
                pid = self.by_key.pop(key)
                pool = self.pools.pop(pid)
                pool.retired = True
                for cookie in list(pool.socks):
                    self._forget(pool, cookie)
                self._drain_queue(pid, set())

    # ---- kernel events (agent thread) ------------------------------------------
    def in_pod(self, cookie: int) -> bool:
        """Upstream `cookie` was made in its destination pod's network namespace
        (whose sidecar answers the app's close 503: outlier detection counts it so)."""
        pool = self.pools.get(self.owner.get(cookie, -1))
        return pool is not None and pool.key.netns is not None

    def release(self, cookies: list[int]) -> None:
        """A client closed: its bound upstream sockets are closed (refilled later)."""
        with self.mu:
            for cookie in cookies:
                pid = self.owner.get(cookie)
                if pid is not None and pid in self.pools:
                    pool = self.pools[pid]
                    if cookie in pool.free:  # bound and released between two looks
                        pool.taken += 1
                    self._forget(pool, cookie)
        if cookies:
            self.wake.set()

    def look(self, bound: set[int], misses: dict[int, int]) -> None:
        """The agent's periodic look: `bound` is the set of upstream cookies the
        kernel bound to a client (keys of dp_peer), `misses` the kernel's
        monotonic dp_pool_miss counters. Accounts taken sockets, resizes each
        pool from its demand, closes dead and surplus sockets, and wakes the
        refill thread when a pool is short."""
        now = time.monotonic()
        short = False
        with self.mu:
            self._reap_dead()
            for pool in list(self.pools.values()):
                taken = pool.free & bound
                pool.free -= taken
                seen = misses.get(pool.pool_id, 0)
                if pool.demand.last_at is None:
                    pool.misses = seen  # the counter of a reused pool id: not this pool's
                pool.target = pool.demand.observe(now, pool.taken + len(taken),
                                                  max(0, seen - pool.misses))
                pool.taken, pool.misses = 0, seen
                surplus = len(pool.free) - pool.target
                if surplus > 0:
                    self._shrink(pool, surplus)
                short = short or surplus < 0
        if short:
            self.wake.set()

    def wait_filled(self, timeout: float = 2.0) -> bool:
        """Block until every pool holds its target (or `timeout`): a plan's new
        pools are warm before the plan goes live. True when they are."""
        deadline = time.monotonic() + timeout
        self.start()
        while time.monotonic() < deadline:
            with self.mu:
                if all(len(p.free) >= p.target or p.failures for p in self.pools.values()):
                    return True
            self.wake.set()
            time.sleep(0.005)
        return False

    # ---- refill thread ---------------------------------------------------------
    def _refill_loop(self) -> None:
        self._switch = NetnsSwitch()
        try:
            while not self._stop.is_set():
                self.idle.clear()
                made = self._refill_round()
                if not made:
                    self.idle.set()
                    self.wake.wait(0.05)
                    self.wake.clear()
        finally:
            self._switch.close()

    def _refill_round(self) -> int:
        """One pass over the pools: make up to BATCH sockets for each short one."""
        with self.mu:
            total = sum(len(p.socks) for p in self.pools.values())
            todo = [(p, min(BATCH, p.target - len(p.free), MAX_TOTAL - total))
                    for p in self.pools.values()]
        made = 0
        for pool, n in todo:
            if n <= 0 or self._stop.is_set():
                continue
            if pool.failures % 20:
                pool.failures += 1  # a failing endpoint is retried every 20th round
                continue
            if pool.pause_until > time.monotonic():
                continue
            got = self._refill(pool, n)
            if 0 < got < n or (got == 0 and not pool.failures):
                pool.pause_until = time.monotonic() + CONGESTED_PAUSE_S
            made += got
        return made

    def _refill(self, pool: Pool, n: int) -> int:
        t0 = time.monotonic()
        try:
            return self._refill1(pool, n)
        finally:
            dt = time.monotonic() - t0
            self.timing["refills"] += 1
            self.timing["refill_s"] += dt
            self.timing["refill_max_s"] = max(self.timing["refill_max_s"], dt)

    def _refill1(self, pool: Pool, n: int) -> int:
        port = pool.key.port
        # in a pod, to its app on loopback: pair the app's end (paired mode)
        announce = (lambda s: self.dp.announce_pair(s, port)) \
            if pool.key.netns and self.pairing else None
        try:
            socks = self._connect(pool.key, n, announce)
        except OSError as exc:
            pool.failures += 1
            if pool.failures in (1, 10, 100):
                log.warning("pool %s:%d: connect failed: %s", pool.key.address, pool.key.port, exc)
            return 0
        pool.failures = 0
        unpaired = socks if announce is None else self._await_pairs(socks, port)
        with self.mu:
            for s in socks:
                self._offer(pool, s, tcp=s in unpaired)
        self.timing["made"] += len(socks)
        return len(socks)

    def _connect(self, key: EndpointKey, n: int,
                 announce: Callable[[socket.socket], object] | None) -> list[socket.socket]:
        if self.connect is not None:
            return self.connect(key.netns, key.address, key.port, n, announce=announce)
        sw = self._switch
        if sw is None:  # not on the refill thread
            return connect_in_netns(key.netns, key.address, key.port, n, announce=announce)
        sw.enter(key.netns)
        loopback = key.address.startswith("127.")
        return make_sockets(key.address, key.port, n, announce=announce,
                            timeout=LOOPBACK_CONNECT_TIMEOUT_S if loopback else 1.0,
                            withdraw=lambda s: self.dp.withdraw_pair(s, key.port))

    def _offer(self, pool: Pool, s: socket.socket, tcp: bool = False) -> None:
        """A made socket into dp_up and the pool's kernel queue (under the lock).
        `tcp`: not paired (requests of retry routes avoid it, dp_retry.h)."""
        if pool.retired:
            s.close()
            return
        s.setblocking(False)
        try:
            cookie = self.dp.add_upstream(s)
        except OSError:
            s.close()
            return
        if tcp:
            self.dp.mark_tcp(cookie)
        pool.socks[cookie] = s
        self.owner[cookie] = pool.pool_id
        self.ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self.fd_cookie[s.fileno()] = cookie
        try:
            self.dp.push_free(pool.pool_id, cookie)
        except OSError:
            self._forget(pool, cookie)
            return
        pool.free.add(cookie)

    def _await_pairs(self, socks: list[socket.socket], port: int,
                     wait: float = 0.2) -> list[socket.socket]:
        """Offer a socket only once its pair is made (or given up), so that one
        upstream never takes both ways (TCP, then paired) and reorders."""
        deadline = time.monotonic() + wait
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if self.dp.pair_pending(s, port)]
            if pending:
                time.sleep(0.002)
        for s in pending:
            self.dp.withdraw_pair(s, port)
            self.unpaired += 1
        return pending

    # ---- bookkeeping (under the lock) ------------------------------------------
    def _shrink(self, pool: Pool, n: int) -> None:
        """Close n free sockets (taken out of the kernel queue first). One the
        kernel bound since the look read dp_peer is not in the queue any more: it
        stays, bound (released when its client closes); closed, its request in
        flight could lose its answer (seen under load: 2 of 15 traced test_churn
        runs closed one or two that way; docs/test-harness.md)."""
        surplus = set(list(pool.free)[:n])
        for cookie in self._drain_queue(pool.pool_id, surplus):
            self._forget(pool, cookie)

    def _reap_dead(self) -> None:
        """Readable upstream sockets: EOF/error (dead), or data the retry and
        delay agents claim. The kernel takes U's data, so readiness means one of
        those, except for a wake-up with an empty queue (seen under load: EPOLLIN,
        then EAGAIN), which must not close U or make the reset agent answer 503."""
        dead_free: dict[int, set[int]] = {}
        for fd, _ in self.ep.poll(0):
            cookie = self.fd_cookie.get(fd, 0)
            pid = self.owner.get(cookie)
            if pid is None or pid not in self.pools or not self._dead(cookie):
                continue
            pool = self.pools[pid]
            if cookie in pool.free:
                dead_free.setdefault(pid, set()).add(cookie)
            self._forget(pool, cookie)
        for pid, dead in dead_free.items():
            self._drain_queue(pid, dead)

    def _dead(self, cookie: int) -> bool:
        """Readable pooled upstream `cookie`: True when it is at EOF or in error
        and no agent kept it (the caller closes it).

        Data first (`claim`: a diverted response, a held request), then a second
        look at the queue before the EOF agents (`claim_eof`, whose answer to a
        waiting request is a 503): the delay thread reads a held request on a
        thread of its own, so the bytes the first look saw can be gone, sent to
        the app, by the time the delayer is asked (seen under load: a 503 for a
        delayed request whose response was on its way, test_delay's /s/1)."""
        s = self.pools[self.owner[cookie]].socks.get(cookie)
        if _woke_empty(s) or (self.claim is not None and self.claim(cookie)):
            return False
        # Not at EOF: empty (a claimer read what the first look saw meanwhile) or
        # data that came since (a keep-alive client's next request, held again),
        # which the next poll offers to the claimers
        if not _at_eof(s):
            return False
        return not (self.claim_eof is not None and self.claim_eof(cookie))

    def _drain_queue(self, pid: int, dead: set[int]) -> set[int]:
        """Take dead cookies out of the kernel free queue (pop all, push back the
        live); returns the dead cookies found in it (the others were bound)."""
        if pid not in self.dp.pool_maps:
            return set(dead)
        live, found = [], set()
        while (c := self.dp.pop_free(pid)) is not None:
            if c in dead:
                found.add(c)
            elif pid in self.pools and c in self.pools[pid].socks:
                live.append(c)
        for c in live:
            self.dp.push_free(pid, c)
        if pid in self.pools:
            pool = self.pools[pid]
            pool.taken += len(pool.free - set(live) - found)  # bound while we drained
            pool.free = set(live)
        return found

    def _forget(self, pool: Pool, cookie: int) -> None:
        s = pool.socks.pop(cookie, None)
        pool.free.discard(cookie)
        self.owner.pop(cookie, None)
        self.dp.drop_peer(cookie)
        if s is not None:
            self.fd_cookie.pop(s.fileno(), None)
            s.close()  # also leaves the epoll set

    # ---- views ------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Pool sizes and demand for /debug/fastpath and the tests."""
        with self.mu:
            return [{"pool": p.pool_id, "address": p.key.address, "port": p.key.port,
                     "netns": p.key.netns, "target": p.target, "sockets": len(p.socks),
                     "free": len(p.free), "bound": len(p.socks) - len(p.free),
                     "taken": p.demand.taken_total, "missed": p.demand.missed_total,
                     "demand_per_s": round(p.demand.peak, 1)}
                    for p in sorted(self.pools.values(), key=lambda p: p.pool_id)]

    def total_sockets(self) -> int:
        with self.mu:
            return sum(len(p.socks) for p in self.pools.values())

    def close(self) -> None:
        """Stop the refill thread, then close every pooled socket."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self.mu:
            for pool in list(self.pools.values()):
                pool.retired = True
                for cookie in list(pool.socks):
                    self._forget(pool, cookie)
            self.pools.clear()
            self.by_key.clear()
            self.ep.close()


def _at_eof(s: socket.socket | None) -> bool:
    """True when `s` is at EOF or in error (or gone); False when it has data or
    nothing to read. The look before the EOF agents: data is a claimer's, never a 503."""
    if s is None:
        return True
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error (reset): dead


def _woke_empty(s: socket.socket | None) -> bool:
    """True when `s` has nothing to read and no error: no data, no EOF (EAGAIN)."""
    if s is None:
        return False
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False  # an error (reset): dead
    return False  # data (claimed) or EOF (b"")
