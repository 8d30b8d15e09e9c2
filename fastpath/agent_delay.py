"""The agent's half of the data path's fault delays (the kernel half: bpf_src/dp_delay.h).

Owner: the fault-delay part of K2. One `Delayer` per node datapath, with a thread
of its own (a BCC compile on the agent's threads, seconds, must not stretch a
delay): `program()` at each plan apply and `on_close()` when a client closes
(agent threads), `claim()` from the pools' look at readable upstreams, `wake()`
for a DP_EV_DELAY event; `start()`/`close()` by the node.

The kernel redirected a sampled request into the bound upstream U's own receive
queue and recorded it in dp_dly[U] (client, time of the decision, length,
delay). The thread finds the record (woken by the event, or by its own scan
every SCAN_S), reads exactly that many bytes from U through a duplicate of U's
descriptor (the pools may close theirs meanwhile: never a reused descriptor),
deletes the record, and at decision time + delay writes the bytes to U, so the
app sees the request as Envoy's router would send it after the fault filter's
delay. A client that closes meanwhile cancels it (Envoy: the stream is reset,
the upstream never sees the request).
"""

from __future__ import annotations

import ctypes as ct
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastpath import bpfsys
from fastpath.loader import drop_generation, socket_cookie
from fastpath.plan import ClusterAction, KernelPlan, Verdict
from fastpath.timeouts import LazyInjector

log = logging.getLogger(__name__)

SCAN_S = 0.01  # the record scan when no event came (a busy event thread)
READ_GIVE_UP_S = 1.0  # the request's bytes not all in U's queue by then: dropped


def needs_delay(plan: KernelPlan) -> bool:
    """True when a KERNEL route of `plan` has a fault delay: the node's program is
    then compiled with -DDP_DELAY=1."""
    return any(r.fault_delay is not None and r.verdict is Verdict.KERNEL
               and isinstance(r.action, ClusterAction)
               for lst in plan.listeners for vh in lst.virtual_hosts for r in vh.routes)


@dataclass
class Held:
    """One request held on upstream `up` until `due` (monotonic seconds)."""

    up: int
    client: int
    length: int
    due: float
    sock: socket.socket  # a duplicate of U's descriptor, owned here
    buf: bytearray = field(default_factory=bytearray)
    seen: float = field(default_factory=time.monotonic)


@dataclass
class HeldReply:
    """A fault abort reply due at `due` (monotonic seconds) to client `client`."""

    due: float
    client: int
    gen: int
    reply: int


def abort_replies(sp: Any) -> dict[int, tuple[int, bytes, bytes]]:
    """Route id -> (its fault abort reply's index in l7fp_replies, the reply, its
    HEAD form) from the synthesized tables (fastpath.synth: replies in pairs)."""
    rows = getattr(sp, "rows", {}) or {}
    if "l7fp_routes" not in rows or "l7fp_replies" not in rows:
        return {}
    from fastpath import bpf_structs as bs

    st = bs.structs(sp.knobs)
    blobs = [st.Blob.from_buffer_copy(b.ljust(ct.sizeof(st.Blob), b"\0"))
             for b in rows["l7fp_replies"]]
    out = {}
    for raw in rows["l7fp_routes"]:
        row = st.Route.from_buffer_copy(raw.ljust(ct.sizeof(st.Route), b"\0"))
        i = int(row.fault_reply)
        if row.fault_status and i + 1 < len(blobs):
            full, head = blobs[i], blobs[i + 1]
            out[int(row.route_id)] = (i, bytes(full.b[:full.len]), bytes(head.b[:head.len]))
    return out


class Delayer:
    def __init__(self, dp: Any, pools: Any) -> None:
        self.dp = dp
        self.pools = pools
        self.cv = threading.Condition()
        self.held: dict[int, Held] = {}  # U cookie -> request (under cv)
        self.stats: Counter[str] = Counter()
        self.replies: list[HeldReply] = []  # fault aborts due after their delay (under cv)
        self.reply_bytes: dict[tuple[int, int], bytes] = {}  # (gen, l7fp_replies index)
        self.injector = LazyInjector(dp, slot=1)  # slot 0 is the route timeouts'
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- plan (agent_synth.program) ------------------------------------------
    def program(self, sp: Any, gen: int) -> None:
        """Write generation `gen` of dp_dpol from the synthesized plan's KERNEL routes,
        and keep the bytes of their fault abort replies (injected after a delay)."""
        t = self.dp.bpf["dp_dpol"]
        drop_generation(t, gen)
        aborts = abort_replies(sp)
        with self.cv:
            self.reply_bytes = {k: v for k, v in self.reply_bytes.items() if k[0] != gen}
        for rid, r in enumerate(getattr(sp, "routes", ())):
            fd = getattr(r, "fault_delay", None)
            if r is None or fd is None or r.verdict is not Verdict.KERNEL:
                continue
            reply = aborts.get(rid) if r.fault_abort is not None else None
            t[t.Key(gen=gen, route=rid + 1)] = t.Leaf(
                per_million=fd.per_million, delay_ms=fd.delay_ms,
                abort_reply=0 if reply is None else reply[0] + 1)
            if reply is not None:
                with self.cv:
                    self.reply_bytes[(gen, reply[0])] = reply[1]
                    self.reply_bytes[(gen, reply[0] + 1)] = reply[2]

    # ---- other threads ---------------------------------------------------------
    def wake(self) -> None:
        """DP_EV_DELAY: a record is (about to be) in dp_dly."""
        with self.cv:
            self.cv.notify()

    def on_reply(self, client: int, t_ns: int, delay_ms: int, gen: int, reply: int) -> None:
        """DP_EV_DELAY_REPLY: the kernel dropped a request whose fault abort it drew
        after a delay; its reply (blob `reply` of generation `gen`) is due then."""
        with self.cv:
            self.replies.append(HeldReply(t_ns / 1e9 + delay_ms / 1000.0, client, gen, reply))
            self.stats["replies_taken"] += 1
            self.cv.notify()

    def claim(self, up: int) -> bool:
        """`up` is readable: True when it holds a request of ours (not an EOF).

        The record first, then `held`: the delay thread moves a request from the
        one to the other (scan: held; read: record deleted) while we look, and in
        this order a request is seen in one of them until it was sent. Held
        first, a scan and read between the two looks made the request nobody's,
        and the reset agent answered U's waiting request 503."""
        if self._record(up) is not None:
            self.wake()
            return True
        with self.cv:
            return up in self.held

    def on_close(self, client: int, ups: list[int]) -> None:
        """A client closed: its held requests are never sent."""
        log.debug("fault delay: client %d closed (upstreams %s)", client, ups)
        with self.cv:
            for up in [u for u, h in self.held.items() if h.client == client or u in ups]:
                self._drop(self.held.pop(up), "cancelled")
            kept = [r for r in self.replies if r.client != client]
            self.stats["cancelled"] += len(self.replies) - len(kept)
            self.replies = kept
            for up in ups:  # held by the kernel, not seen here yet
                if self._record(up) is not None:
                    self._delete_record(up)
                    self.stats["cancelled"] += 1

    # ---- the thread ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="l7fp-delay", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self.cv:
            for h in self.held.values():
                h.sock.close()
            self.held.clear()
        self.injector.close()

    def _loop(self) -> None:
        while True:
            with self.cv:
                if self._stop:
                    return
                self.cv.wait(self._wait_s())
                if self._stop:
                    return
                try:
                    self._turn()
                except Exception:  # never let one bad record end the delays of the node
                    log.exception("fault delay: turn failed")

    def _wait_s(self) -> float:
        dues = [h.due for h in self.held.values() if len(h.buf) >= h.length]
        dues += [r.due for r in self.replies]
        wait = SCAN_S if not dues else min(SCAN_S, min(dues) - time.monotonic())
        return max(0.0, wait)

    def _turn(self) -> None:
        self._scan()
        now = time.monotonic()
        for up, h in list(self.held.items()):
            if len(h.buf) < h.length:
                self._read(h, now)
            elif h.due <= now:
                self._send(self.held.pop(up))
        due = [r for r in self.replies if r.due <= now]
        if due:
            self.replies = [r for r in self.replies if r.due > now]
            for r in due:
                self._inject(r)

    # ---- internals (thread, under cv) ------------------------------------------------
    def _record(self, up: int) -> Any | None:
        return bpfsys.table_get(self.dp.bpf["dp_dly"], up)

    def _scan(self) -> None:
        for k, rec in list(self.dp.bpf["dp_dly"].items()):
            up = int(k.value)
            if up in self.held:
                continue
            if not self._bound(up, int(rec.client)):  # the client closed first
                self._delete_record(up)
                self.stats["cancelled"] += 1
                continue
            s = self._sock(up)
            if s is None:
                continue  # not (yet) a socket of the pools: the next scan
            due = int(rec.t_ns) / 1e9 + int(rec.delay_ms) / 1000.0  # CLOCK_MONOTONIC both
            self.held[up] = Held(up, int(rec.client), int(rec.len), due, s)
            log.debug("fault delay: client %d's request on %d held", int(rec.client), up)
            self.stats["taken"] += 1

    def _sock(self, up: int) -> socket.socket | None:
        pid = self.pools.owner.get(up)
        pool = self.pools.pools.get(pid) if pid is not None else None
        s = pool.socks.get(up) if pool is not None else None
        if s is None:
            return None
        try:
            d = s.dup()
        except OSError:
            return None
        # the pools may close theirs while we dup it (another thread): a reused
        # descriptor would be another socket, so the duplicate's cookie must be U's
        try:
            same = socket_cookie(d) == up
        except OSError:
            same = False
        if not same:
            d.close()
            return None
        d.setblocking(False)
        return d

    def _read(self, h: Held, now: float) -> None:
        while len(h.buf) < h.length:
            try:
                chunk = h.sock.recv(h.length - len(h.buf))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._forget(h, "upstream_gone")
                return
            h.buf += chunk
        if len(h.buf) >= h.length:
            self._delete_record(h.up)  # read: U's next bytes are not ours
        elif now - h.seen > READ_GIVE_UP_S:
            self._forget(h, "read_timeout")

    def _bound(self, up: int, client: int) -> bool:
        """U is still the pools' and bound to the client that sent the request: a
        client that closed (its upstreams released, dp_peer entries gone) before
        on_close could see the held request is noticed here."""
        if self.pools.owner.get(up) is None:
            return False
        peer = bpfsys.table_get(self.dp.bpf["dp_peer"], up)
        return peer is not None and int(peer.client) == client

    def _send(self, h: Held) -> None:
        if not self._bound(h.up, h.client):
            self._drop(h, "cancelled")
            return
        late = time.monotonic() - h.due
        try:
            h.sock.setblocking(True)
            h.sock.settimeout(1.0)
            h.sock.sendall(bytes(h.buf))
            self.stats["sent"] += 1
            log.debug("fault delay: client %d's request on %d sent", h.client, h.up)
            self.stats["max_late_ms"] = max(self.stats["max_late_ms"], int(late * 1000))
        except OSError as exc:
            self.stats["send_failed"] += 1
            log.warning("fault delay: send on upstream %d failed: %s", h.up, exc)
        finally:
            h.sock.close()

    def _inject(self, r: HeldReply) -> None:
        data = self.reply_bytes.get((r.gen, r.reply))
        if data is None:
            self.stats["reply_unknown"] += 1
            return
        if self.injector.send(r.client, data):
            self.stats["replies_sent"] += 1
        else:
            self.stats["cancelled"] += 1  # the client is gone

    def _forget(self, h: Held, why: str) -> None:
        self.held.pop(h.up, None)
        self._delete_record(h.up)
        self._drop(h, why)

    def _drop(self, h: Held, why: str) -> None:
        h.sock.close()
        self.stats[why] += 1
        log.info("fault delay: client %d's request on %d dropped: %s", h.client, h.up, why)

    def _delete_record(self, up: int) -> None:
        bpfsys.table_delete(self.dp.bpf["dp_dly"], up)

    def debug(self) -> dict[str, Any]:
        with self.cv:
            return {"held": len(self.held), **self.stats}

