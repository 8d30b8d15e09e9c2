"""Per-endpoint pools of upstream connections for the fast path.

Owner: K2. Driven by `fastpath.agent` (one `Pools` per node datapath, called
from the agent's thread only). Each pool is one endpoint (address, port) of
one cluster; its free sockets sit in the kernel queue `dp_free[pool]`, where
sk_msg pops one and binds it to a client connection for the connection's
life. When the client closes, sock_ops reports the bound sockets and the pool
closes them (a response may still be in flight on them) and refills with
fresh ones in the background. Sockets an upstream closes are noticed (EOF)
and replaced. The agent never reads an upstream socket: sk_skb.c takes every
byte it receives.

Endpoints inside a pod's network namespace are reached from inside that
namespace on loopback, which bypasses the destination's inbound interception
(the kernel then enforces that pod's inbound policy, DESIGN.md rule 4).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
MIN_DEPTH = 4
MAX_DEPTH = 128
SHRINK_AFTER_S = 5.0  # a pool without misses this long halves its target


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
    target: int = MIN_DEPTH  # free sockets wanted; grows on demand
    socks: dict[int, socket.socket] = field(default_factory=dict)  # cookie -> socket
    free: set[int] = field(default_factory=set)  # cookies offered to the kernel queue
    failures: int = 0
    misses: int = 0  # last seen value of the kernel's dp_pool_miss counter
    grown_at: float = 0.0


def connect_in_netns(netns: str | None, address: str, port: int, n: int,
                     timeout: float = 1.0,
                     announce: Callable[[socket.socket], object] | None = None
                     ) -> list[socket.socket]:
    """`n` TCP connections to address:port, made inside the network namespace
    file `netns` (None: this one). setns() acts on the calling thread only, so
    a short-lived thread does it and the sockets keep their namespace.
    `announce(sock)` runs after bind and before connect (pairing)."""
    out: list[socket.socket] = []
    err: list[BaseException] = []

    def work() -> None:
        try:
            if netns:
                libc = ct.CDLL(None, use_errno=True)
                fd = os.open(netns, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        e = ct.get_errno()
                        raise OSError(e, f"setns {netns}: {os.strerror(e)}")
                finally:
                    os.close(fd)
            for _ in range(n):
                s = socket.socket()
                try:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.settimeout(timeout)
                    s.bind((address if address.startswith("127.") else "0.0.0.0", 0))
                    if announce is not None:
                        announce(s)
                    s.connect((address, port))
                except BaseException:
                    s.close()
                    raise
                out.append(s)
        except BaseException as exc:  # reported to the caller's thread
            err.append(exc)

    t = threading.Thread(target=work, name="l7fp-pool-connect", daemon=True)
    t.start()
    t.join(timeout * (n + 1) + 1)
    if err and not out:
        raise err[0]
    return out


class Pools:
    """All upstream pools of one node datapath (`fastpath.loader.Datapath`)."""

    def __init__(self, dp: Any, connect: Callable[..., list[socket.socket]] = connect_in_netns,
                 pairing: bool = True) -> None:
        self.dp = dp
        self.pairing = pairing
        self.unpaired = 0  # upstreams whose app end could not be paired (TCP way)
        self.connect = connect
        self.pools: dict[int, Pool] = {}
        self.by_key: dict[EndpointKey, int] = {}
        self.sel = selectors.DefaultSelector()
        self.owner: dict[int, int] = {}  # cookie -> pool id

    # ---- configuration -----------------------------------------------------
    def ensure(self, key: EndpointKey) -> int:
        """The pool id of endpoint `key`, created (empty) on first use."""
        pid = self.by_key.get(key)
        if pid is None:
            pid = next(i for i in range(len(self.pools) + 1) if i not in self.pools)
            self.pools[pid] = Pool(pid, key)
            self.by_key[key] = pid
            self.dp.ensure_pool(pid, MAX_DEPTH * 2)
        return pid

    def retire(self, keep: set[EndpointKey]) -> None:
        """Close the pools of endpoints no longer in any plan (or unhealthy)."""
        for key in [k for k in self.by_key if k not in keep]:
            pid = self.by_key.pop(key)
            pool = self.pools.pop(pid)
            for cookie in list(pool.socks):
                self._forget(pool, cookie)
            self._drain_queue(pid, set())

    # ---- kernel events ----------------------------------------------------
    def release(self, cookies: list[int]) -> None:
        """A client closed: its bound upstream sockets are closed (refilled later)."""
        for cookie in cookies:
            pid = self.owner.get(cookie)
            if pid is not None and pid in self.pools:
                self._forget(self.pools[pid], cookie)

    def note_misses(self, misses: dict[int, int]) -> None:
        """Size pools from demand: grow a pool sk_msg found empty since the last
        look by its misses; halve one without misses for SHRINK_AFTER_S (down to
        MIN_DEPTH)."""
        now = time.monotonic()
        for pool in self.pools.values():
            seen = misses.get(pool.pool_id, 0)
            if seen > pool.misses:
                # one more ready socket per miss, at most doubling per look
                grow = min(seen - pool.misses, pool.target)
                pool.target = min(MAX_DEPTH, pool.target + grow)
                pool.grown_at = now
            elif pool.target > MIN_DEPTH and now - pool.grown_at > SHRINK_AFTER_S:
                pool.target = max(MIN_DEPTH, pool.target // 2)
                pool.grown_at = now
            pool.misses = seen

    # ---- upkeep (agent thread) --------------------------------------------
    def upkeep(self, bound: set[int]) -> None:
        """Close dead sockets, account bound ones, refill to each pool's target.

        `bound` is the set of upstream cookies the kernel bound to a client
        (keys of dp_peer): those are no longer free.
        """
        self._reap_dead()
        for pool in list(self.pools.values()):
            pool.free -= bound
            missing = pool.target - len(pool.free)
            if missing > 0:
                self._refill(pool, missing)
            elif missing < 0:
                self._shrink(pool, -missing)

    def _shrink(self, pool: Pool, n: int) -> None:
        """Close n free sockets (taken out of the kernel queue first)."""
        surplus = set(list(pool.free)[:n])
        self._drain_queue(pool.pool_id, surplus)
        for cookie in surplus:
            self._forget(pool, cookie)

    def _refill(self, pool: Pool, n: int) -> None:
        port = pool.key.port
        # in a pod, to its app on loopback: pair the app's end (paired mode)
        announce = (lambda s: self.dp.announce_pair(s, port)) \
            if pool.key.netns and self.pairing else None
        try:
            socks = self.connect(pool.key.netns, pool.key.address, port, n, announce=announce)
        except OSError as exc:
            pool.failures += 1
            if pool.failures in (1, 10, 100):
                log.warning("pool %s:%d: connect failed: %s", pool.key.address, pool.key.port, exc)
            return
        pool.failures = 0
        if announce is not None:
            self._await_pairs(socks, port)
        for s in socks:
            s.setblocking(False)
            cookie = self.dp.add_upstream(s)
            pool.socks[cookie] = s
            self.owner[cookie] = pool.pool_id
            self.sel.register(s, selectors.EVENT_READ, cookie)
            try:
                self.dp.push_free(pool.pool_id, cookie)
            except OSError:
                self._forget(pool, cookie)
                continue
            pool.free.add(cookie)

    def _await_pairs(self, socks: list[socket.socket], port: int, wait: float = 0.2) -> None:
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

    def _reap_dead(self) -> None:
        """An upstream socket is readable only at EOF/error (sk_skb takes the data)."""
        dead_free: dict[int, set[int]] = {}
        for key, _ in self.sel.select(timeout=0):
            cookie = int(key.data)
            pid = self.owner.get(cookie)
            if pid is None or pid not in self.pools:
                continue
            pool = self.pools[pid]
            if cookie in pool.free:
                dead_free.setdefault(pid, set()).add(cookie)
            self._forget(pool, cookie)
        for pid, dead in dead_free.items():
            self._drain_queue(pid, dead)

    def _drain_queue(self, pid: int, dead: set[int]) -> None:
        """Take dead cookies out of the kernel free queue (pop all, push back the live)."""
        if pid not in self.dp.pool_maps:
            return
        live = []
        while (c := self.dp.pop_free(pid)) is not None:
            if c not in dead and pid in self.pools and c in self.pools[pid].socks:
                live.append(c)
        for c in live:
            self.dp.push_free(pid, c)
        if pid in self.pools:
            self.pools[pid].free = set(live)

    def _forget(self, pool: Pool, cookie: int) -> None:
        s = pool.socks.pop(cookie, None)
        pool.free.discard(cookie)
        self.owner.pop(cookie, None)
        self.dp.drop_peer(cookie)
        if s is not None:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    # ---- views ------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Pool sizes for /debug/fastpath and the churn test."""
        return [{"pool": p.pool_id, "address": p.key.address, "port": p.key.port,
                 "netns": p.key.netns, "target": p.target, "sockets": len(p.socks),
                 "free": len(p.free), "bound": len(p.socks) - len(p.free)}
                for p in sorted(self.pools.values(), key=lambda p: p.pool_id)]

    def total_sockets(self) -> int:
        return sum(len(p.socks) for p in self.pools.values())

    def close(self) -> None:
        for pool in list(self.pools.values()):
            for cookie in list(pool.socks):
                self._forget(pool, cookie)
        self.pools.clear()
        self.by_key.clear()
        self.sel.close()
