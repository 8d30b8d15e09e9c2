"""Route timeouts on the fast path: the agent half.

Owner: NAME=timeout (K2 agent). One `TimeoutKeeper` per node datapath, owned
by `fastpath.agent_node.NodeDatapath`, with a thread of its own that scans the
records every 10 ms (the resolution of a timeout). The kernel half is
bpf_src/dp_timeout.h: sk_msg records each request forwarded on a route with a
timeout (dp_tmo, keyed by the pooled upstream U), the response path marks it
started/complete.

On expiry, as Envoy's router does (checked against a real Envoy in
tests/kernel_datapath/test_timeouts.py):

* no response byte passed yet: the agent claims the request (delete of
  dp_tmo_armed[U]; the kernel's first response byte deletes it too, whoever
  succeeds owns the client's receive queue), takes U off every way (dp_peer,
  dp_srv, dp_up: a late response never reaches the client) and closes it
  (Envoy closes the upstream connection), then writes Envoy's 504 into the
  client's receive queue through the injector socket (bpf_src/dp_inject.c).
  The client's connection stays usable; its next request finds U gone and
  goes to Envoy.
* response started, not complete (Content-Length framing): U is taken away
  and closed, and the client connection is destroyed (sock_diag SOCK_DESTROY
  in the client's netns: the client sees the response cut, then an aborted
  connection; Envoy closes it with a FIN after its delayed_close_timeout).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastpath import bpfsys
from fastpath.pools import enter_netns

log = logging.getLogger(__name__)

TIMEOUT_BODY = "upstream request timeout"
DP_TMO_STARTED = 3  # bpf_src/dp_timeout.h


RESET_BODY = ("upstream connect error or disconnect/reset before headers. "
              "reset reason: connection termination")


def local_reply(status: str, body: str, date: str | None = None) -> bytes:
    """One of Envoy's local replies to an upstream failure (status, headers and
    body as a real Envoy 1.40 sends them, without `server: envoy`, like the
    kernel's other replies)."""
    date = date or time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
    data = body.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-length: {len(data)}\r\n"
            f"content-type: text/plain\r\ndate: {date}\r\n\r\n").encode() + data


def timeout_reply(date: str | None = None) -> bytes:
    """Envoy's 504 for a route timeout."""
    return local_reply("504 Gateway Timeout", TIMEOUT_BODY, date)


def reset_reply(date: str | None = None) -> bytes:
    """Envoy's 503 for an upstream that closed (FIN or RST) before any response
    byte (fastpath.agent_reset); the same bytes for both, seen on Envoy 1.40."""
    return local_reply("503 Service Unavailable", RESET_BODY, date)


@dataclass(frozen=True)
class Expired:
    """One timed request whose deadline passed (a copy of its dp_tmo record)."""

    up: int
    client: int
    state: int
    route: int
    cli_ip: int  # network order, as the kernel stores it
    cli_port: int
    dst_ip: int
    dst_port: int
    deadline_ns: int = 0


def due(records: list[tuple[int, Any]], now_ns: int) -> list[Expired]:
    """The records whose deadline passed at `now_ns` (CLOCK_MONOTONIC, the clock
    of bpf_ktime_get_ns). Pure: the unit tests call it with plain objects."""
    out = []
    for up, r in records:
        if r.deadline_ns and r.deadline_ns <= now_ns:
            out.append(Expired(up, int(r.client), int(r.state), int(r.route), int(r.cli_ip),
                               int(r.cli_port), int(r.dst_ip), int(r.dst_port),
                               int(r.deadline_ns)))
    return out


class Injector:
    """The agent's loopback socket in dp_inj: a write of (cookie, bytes) lands in
    that client's receive queue (bpf_src/dp_inject.c)."""

    def __init__(self, dp: Any, slot: int = 0) -> None:
        """`slot`: its entry in dp_inj (0: the route timeouts', 1: the fault delays')."""
        lst = socket.socket()
        try:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            self.sock = socket.create_connection(lst.getsockname(), timeout=2)
            self.peer, _ = lst.accept()
        finally:
            lst.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bpfsys.map_update(dp.fds["dp_inj"], ct.c_uint32(slot), ct.c_uint32(self.sock.fileno()))

    def send(self, client_cookie: int, data: bytes) -> bool:
        """False when the client is gone (the kernel drops the write)."""
        try:
            self.sock.sendall(struct.pack("<Q", client_cookie) + data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class LazyInjector:
    """An Injector in one dp_inj slot, made at its first send (a plan that
    never needs it costs no socket), as each agent that answers a client by
    injection holds one (route timeouts slot 0, fault delays 1, redirects 2,
    resets 3, lost retries 4). Thread-safe: its lock keeps one writer at a
    time (a (cookie, bytes) record written by two threads at once would
    interleave). The owner calls close() at its own close, before the
    datapath's maps close; after it every send is refused (a thread of the
    owner finishing late, such as agent_lost.Handoff's, must neither leave a
    socket nor write dp_inj through a closed, possibly reused, fd)."""

    def __init__(self, dp: Any, slot: int) -> None:
        self.dp = dp
        self.slot = slot
        self._inj: Injector | None = None
        self._closed = False
        self._lock = threading.Lock()

    def send(self, client_cookie: int, data: bytes) -> bool:
        """Injector.send, after making the socket if this is the first send;
        False once closed (nothing made, nothing sent)."""
        with self._lock:
            if self._closed:
                return False
            if self._inj is None:
                self._inj = Injector(self.dp, slot=self.slot)
            return self._inj.send(client_cookie, data)

    def close(self) -> None:
        """Closes the socket if one was made; every later send returns False."""
        with self._lock:
            self._closed = True
            if self._inj is not None:
                self._inj.close()
                self._inj = None


# sock_diag (linux/inet_diag.h): SOCK_DESTROY of one TCP socket by 4-tuple + cookie
NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def destroy_msg(src: int, sport: int, dst: int, dport: int, cookie: int) -> bytes:
    """The netlink request that aborts one IPv4 TCP socket. `src`/`dst` as the
    kernel stores them (network order read natively), ports in host order."""
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    sockid = struct.pack(">HH", sport, dport) + struct.pack("=I12xI12x", src, dst) + \
        struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    body = req + sockid
    return struct.pack("=IHHII", 16 + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0) \
        + body


def destroy_socket(netns: str | None, src: int, sport: int, dst: int, dport: int,
                   cookie: int) -> int:
    """Abort the client socket (RST to its peer, ECONNABORTED to its owner).
    Runs in a short thread inside `netns` (setns acts on the calling thread).
    Returns 0 or the kernel's errno."""
    result: list[int] = []

    def work() -> None:
        try:
            if netns:
                try:
                    enter_netns(netns)
                except OSError as e:
                    result.append(e.errno or 0)
                    return
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
                nl.settimeout(1.0)
                nl.send(destroy_msg(src, sport, dst, dport, cookie))
                ans = nl.recv(4096)
            kind = struct.unpack_from("=H", ans, 4)[0]
            err = -struct.unpack_from("=i", ans, 16)[0] if kind == NLMSG_ERROR else 0
            result.append(err)
        except OSError as exc:
            result.append(exc.errno or -1)

    t = threading.Thread(target=work, name="l7fp-sock-destroy", daemon=True)
    t.start()
    t.join(3)
    return result[0] if result else -1


class TimeoutKeeper:
    """Expires the timed requests of one node datapath.

    Runs its own thread (`start`), not the agent's: that one also compiles BCC
    modules, which takes seconds, and a timer that waits for a compile fires
    late (seen in the mesh test: a 1 s timeout answered after 3 s). The thread
    only makes map syscalls and writes to its injector; the upstream sockets
    it takes away are closed by their owner, the agent thread, through
    `closed()` (fastpath.pools is the agent thread's only)."""

    PERIOD_S = 0.01  # scan period: the resolution of a timeout

    def __init__(self, dp: Any, netns: str | None) -> None:
        self.dp = dp
        self.netns = netns  # the client pod's network namespace (its sockets)
        self.injector = LazyInjector(dp, slot=0)
        self.counts = {"timeout_504": 0, "timeout_reset": 0, "timeout_raced": 0,
                       "timeout_retried": 0}
        self.enabled = threading.Event()  # set while the plan has route timeouts
        # retry(up): True when a retry takes the attempt whose per-try timeout
        # passed, instead of a 504 (fastpath.agent_reset.Resetter.per_try_expired; this thread)
        self.retry: Callable[[int], bool] | None = None
        # fastpath.agent_outlier.OutlierKeeper.count_error (set by agent_node):
        # a timed-out attempt counts for its host (Envoy: LocalOriginTimeout, 504)
        self.on_error: Callable[[int, int], None] | None = None
        self._taken: list[int] = []  # upstream cookies taken away, for the agent to close
        self._lost: dict[int, int] = {}  # up -> deadline of a record whose claim was lost
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7fp-timeouts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.enabled.wait(0.2):
                continue
            try:
                self.check()
            except Exception:
                log.exception("route timeouts: scan failed")
                self._stop.wait(0.5)
            self._stop.wait(self.PERIOD_S)

    def closed(self) -> list[int]:
        """The upstreams taken away since the last call (agent thread: close them)."""
        with self._lock:
            out, self._taken = self._taken, []
        return out

    def check(self) -> int:
        """Act on every expired record; returns how many. An empty map costs one
        syscall."""
        table = self.dp.bpf["dp_tmo"]
        records = [(int(k.value), v) for k, v in table.items()]
        if not records:
            return 0
        now = time.monotonic_ns()
        expired = due(records, now)
        for e in expired:
            self._expire(e)
        return len(expired)

    def _expire(self, e: Expired) -> None:
        key = ct.c_uint64(e.up)
        # the claim: succeeds only while no response byte went to the client
        # and no retry took the request (fastpath.deadline)
        if e.state != DP_TMO_STARTED and bpfsys.map_delete(self.dp.fds["dp_tmo_armed"], key):
            won = bpfsys.table_get(self.dp.bpf["dp_tmo"], e.up)  # the record as claimed
            if self._moved_later(e, won):
                return
            if self.on_error is not None:
                self.on_error(e.up, 504)
            if _per_try(e, won) and self.retry is not None and self.retry(e.up):
                self.counts["timeout_retried"] += 1  # Envoy resets the attempt, retries
                return
            self._take(e.up)
            if self._inject(e.client, timeout_reply()):
                self.counts["timeout_504"] += 1
            return
        rec = bpfsys.table_get(self.dp.bpf["dp_tmo"], e.up)
        if rec is None:
            self.counts["timeout_raced"] += 1  # the response completed meanwhile
        elif int(rec.state) == DP_TMO_STARTED:
            self._take(e.up)
            err = destroy_socket(self.netns, e.cli_ip, e.cli_port, e.dst_ip, e.dst_port,
                                 e.client)
            if err:
                log.warning("timeout: resetting client socket %d failed: %s", e.client,
                            os.strerror(err) if err > 0 else err)
            self.counts["timeout_reset"] += 1
        elif self._lost.get(e.up) == int(rec.deadline_ns):
            # claimed by someone else twice in a row and never re-armed: stale
            bpfsys.map_delete(self.dp.fds["dp_tmo"], key)
            self._lost.pop(e.up, None)
        else:
            # a retry is moving it (fastpath.deadline), or the kernel is starting
            # the response: the next scan sees where it went
            self._lost[e.up] = int(rec.deadline_ns)

    def _moved_later(self, e: Expired, rec: Any | None) -> bool:
        """After a won claim, `rec` the dp_tmo record read then: True when a retry
        re-armed it with a later deadline between the scan and the claim (the
        claim is given back)."""
        if rec is None or int(rec.deadline_ns) == e.deadline_ns or \
                (rec.deadline_ns and rec.deadline_ns <= time.monotonic_ns()):
            return False
        bpfsys.map_update(self.dp.fds["dp_tmo_armed"], ct.c_uint64(e.up), ct.c_uint32(1))
        return True

    def _take(self, up: int) -> None:
        """No byte of `up` reaches the client any more; the agent closes it
        (Envoy closes the upstream connection of a timed-out request)."""
        self.dp.take_upstream(up)
        bpfsys.map_delete(self.dp.fds["dp_tmo"], ct.c_uint64(up))
        self._lost.pop(up, None)
        with self._lock:
            self._taken.append(up)

    def _inject(self, client: int, data: bytes) -> bool:
        return self.injector.send(client, data)

    def close(self) -> None:
        self._stop.set()
        self.enabled.set()
        if self._thread is not None:
            self._thread.join(5)
        self.injector.close()


def _per_try(e: Expired, rec: Any | None) -> bool:
    """The deadline `e` that passed is the attempt's per-try one, not the route's
    (`rec`: its dp_tmo record)."""
    return rec is not None and bool(rec.try_ms) and int(rec.global_ns) != e.deadline_ns
