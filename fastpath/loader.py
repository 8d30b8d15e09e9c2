"""BCC loading and attachment of the fast-path socket programs.

Owner: K2. Called by `fastpath.agent` (and the kernel tests). One `Datapath`
is one compiled BCC module (sockops.c + sk_msg.c + sk_skb.c sharing the maps
of datapath.h) with its attachments. Attachments are BPF links where the
kernel has them, so they go away with the process even after kill -9; the
`close()` method detaches everything explicitly and is idempotent.

BCC 0.26 cannot wrap SOCKHASH or QUEUE maps, so those are driven through
libbpf (`fastpath.bpfsys`) with the map fds BCC gives us.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastpath import bpf_callback, bpfsys, compile_check
from mesh.plumbing import cgroup2_root  # noqa: F401  (re-exported: one reader of /proc/mounts)

log = logging.getLogger(__name__)

BPF_SRC = Path(__file__).resolve().parent.parent / "bpf_src"

# One compile per (source, cflags) in a process: BCC compiles cost seconds.
# _COMPILED holds the compiled module (never attached: the template of its
# instances), _CACHE the instances (own maps and programs) per instance name,
# _UNCLONABLE the hash of each (source, cflags) whose compiled module raised
# CloneError: compiled for every instance (a hash: a collision costs a compile).
_COMPILED: dict[tuple[str, tuple[str, ...]], Any] = {}
_CACHE: dict[tuple[str, tuple[str, ...], str], Any] = {}
_UNCLONABLE: set[int] = set()
_CACHE_LOCK = threading.Lock()

SO_COOKIE = 57
SO_NETNS_COOKIE = 71
IROUTES = 8  # DP_IROUTES of dp_decide_inline.h: routes per virtual host
IROUTE_TOTAL = 64  # DP_IROUTE_TOTAL: route entries per generation
IPOOLS = 4  # DP_IPOOLS: endpoints per route

# dp_verdict kinds (datapath.h)
K_FORWARD, K_REPLY, K_NEED_MORE, K_PASS = 1, 2, 3, 4


def socket_cookie(sock: socket.socket | int) -> int:
    """The kernel's socket cookie (key of dp_cli/dp_up) of a socket or fd."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    finally:
        if s is not sock:
            s.close()
    return int.from_bytes(raw, "little")


def returning() -> bool:
    """Do connections handed to Envoy come back (bpf_src/dp_return.h)? On unless
    `L7FP_DP_RETURN=0` (then sticky as before, and no sk_skb verdict on client
    sockets: what the A/B measurement in docs/fastpath.md switches)."""
    return os.environ.get("L7FP_DP_RETURN", "1") != "0"


def request_ids() -> bool:
    """Does the kernel path add x-forwarded-proto / x-request-id (bpf_src/dp_xrid.h)?
    On unless `L7FP_DP_XRID=0`: the A/B cost measurement in docs/fastpath.md
    switches it, nothing else (without them the kernel path differs from Envoy)."""
    return os.environ.get("L7FP_DP_XRID", "1") != "0"


def env_cflags(cflags: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`cflags` plus the data path's switches the environment turns off
    (`returning`, `request_ids`): the cflags `Datapath.load` compiles with."""
    return (tuple(cflags) + (() if returning() else ("-DDP_RETURN=0",))
            + (() if request_ids() else ("-DDP_XRID=0",)))


Timing = dict[str, list[float]]  # phase -> [wall s, CPU s of the thread]


@contextmanager
def timed(timing: Timing | None, phase: str) -> Iterator[None]:
    """Add the block's wall time and the calling thread's CPU time (user +
    system, so the verifier's too) to `timing[phase]`: how a node's start
    splits (`/debug/fastpath` "startup"; on a busy machine wall > CPU)."""
    wall, cpu = time.monotonic(), time.thread_time()
    try:
        yield
    finally:
        if timing is not None:
            spent = timing.setdefault(phase, [0.0, 0.0])
            spent[0] = round(spent[0] + time.monotonic() - wall, 3)
            spent[1] = round(spent[1] + time.thread_time() - cpu, 3)


def module_text(decide_header: str | None = None) -> str:
    """The C text of one datapath module; `decide_header` replaces the built-in decision.

    BCC only turns functions of the main text into programs, so the files of
    the data path are pasted together rather than #included. The decision
    header (K1's include/, or dp_decide_inline.h) is pasted too, because its
    maps must live in the same module.
    """
    parts = ["datapath.h", "dp_timeout.h", "dp_reset.h", "dp_close.h", "dp_outlier.h", decide_header or "dp_decide_inline.h",
             "dp_return.h", "dp_retry.h", "dp_mirror.h", "dp_delay.h", "dp_redir.h",
             "dp_rewrite.h", "sockops.c", "sk_msg.c", "sk_skb.c", "dp_inject.c"]
    texts = []
    for p in parts:
        body = (BPF_SRC / p).read_text()
        if p == "dp_decide_l7fp.h":  # K1's headers pasted before the adapter
            from fastpath.synth import decide_text

            texts.append(decide_text())
            body = re.sub(r'^#include "l7fp_decide.h"\s*$', "", body, flags=re.M)
        texts.append(f"/* ---- {p} ---- */\n" + body)
    return "\n".join(texts)


def compile_module(text: str, cflags: tuple[str, ...] = (), include: tuple[str, ...] = (),
                   instance: str = "", check: bool = False, timing: Timing | None = None) -> Any:
    """Compile (or reuse) a BCC module. Raises bcc's exception on a compile error,
    `compile_check.CompileError` when `check` and a child's compile fails first
    (an LLVM abort there would otherwise end this process): for synthesized
    programs, whose cflags come from a plan; fixed sources need no check.

    One compile per (text, cflags) in the process; each instance name gets
    its own maps and programs over that compiled code (`bpf_instance.Instance`):
    two nodes need two instances, a test reusing one instance name reuses its
    maps and loaded programs. A module the instance cannot reproduce exactly
    (`bpf_instance.CloneError`) becomes that instance's own module, and every
    later instance of its (text, cflags) is compiled for itself.
    `timing` gets the phases spent (`timed`): "check", "compile", "maps".
    """
    from bcc import BPF

    from fastpath import bpf_instance

    flags = tuple(cflags) + tuple(f"-I{p}" for p in (str(BPF_SRC), str(BPF_SRC / "include"),
                                                     *include))
    blob = [f for f in flags if f.startswith("-DL7FP_MAX_BLOB=")]
    if blob:  # kernel replies of the plan fit the data path's rewrite buffer
        flags += (f"-DDP_REPLY_MAX={blob[-1].split('=', 1)[1]}",)
    key, code = (text, flags, instance), (text, flags)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if hash(code) in _UNCLONABLE:  # checked when it was first compiled
            with timed(timing, "compile"):
                _CACHE[key] = BPF(text=text.encode(), cflags=list(flags))
            return _CACHE[key]
        compiled = _COMPILED.get(code)
        if compiled is None:
            if check:
                with timed(timing, "check"):
                    compile_check.check(text, flags)  # a child pays an LLVM abort, not us
            with timed(timing, "compile"):
                compiled = BPF(text=text.encode(), cflags=list(flags))
            _COMPILED[code] = compiled
        try:
            with timed(timing, "maps"):
                _CACHE[key] = bpf_instance.Instance(compiled, text)
        except bpf_instance.CloneError as exc:
            # The same code fails the same way for every instance, so no other
            # instance uses this module: it becomes this one's own.
            log.warning("BCC module of %s cannot be instantiated again, compiled for each "
                        "instance from now: %s", instance or "(none)", exc)
            _UNCLONABLE.add(hash(code))
            _CACHE[key] = _COMPILED.pop(code)
        return _CACHE[key]


def drop_generation(table: Any, gen: int) -> None:
    """Delete generation `gen`'s entries of `table` (a BPF hash whose key has a
    `gen` field) before they are written again for a new plan; the other
    generation's, which the programs may be reading, stay. Callers: the
    Datapath's setters and each agent part's `program`."""
    for k in [k for k in table.keys() if k.gen == gen]:
        del table[k]


@dataclass
class Datapath:
    """A loaded datapath module and its attachments (cgroups, maps).

    Owned by one agent; not thread-safe except for the map helpers, which
    are single syscalls.
    """

    bpf: Any
    fds: dict[str, int] = field(default_factory=dict)
    links: list[tuple[str, int]] = field(default_factory=list)  # (what, link fd)
    legacy: list[tuple[int, int, int]] = field(default_factory=list)  # (prog fd, target fd, type)
    cgroups: dict[str, int] = field(default_factory=dict)  # path -> dir fd
    pool_maps: dict[int, int] = field(default_factory=dict)  # pool id -> queue fd
    timing: Timing = field(default_factory=dict)  # its start's phases (`timed`)
    _closed: bool = False
    _lr_mu: threading.Lock = field(default_factory=threading.Lock)  # l7fp_lr_gone's writers

    @classmethod
    def load(cls, cflags: tuple[str, ...] = (), decide_header: str | None = None,
             include: tuple[str, ...] = (), instance: str = "") -> Datapath:
        """Compile, load the three programs and attach sk_msg/sk_skb to their maps.

        `decide_header`: None for the built-in decision (dp_decide_inline.h),
        "dp_decide_l7fp.h" for the plan's l7fp_decide with `cflags` from
        fastpath.synth. `instance` separates the maps of two nodes.
        """
        cflags = env_cflags(cflags)
        timing: Timing = {}
        b = compile_module(module_text(decide_header), cflags, include, instance,
                           check=decide_header is not None, timing=timing)
        dp = cls(bpf=b, timing=timing)
        with timed(timing, "load"):
            dp._load_programs(cflags, decide_header is not None)
        try:
            with timed(timing, "attach"):
                dp._attach_maps(returning())
        except Exception:
            dp.close()
            raise
        return dp

    def _load_programs(self, cflags: tuple[str, ...], synthesized: bool) -> None:
        """Load the module's programs (the verifier's work) and fill its tail-call arrays."""
        from bcc import BPF

        b = self.bpf
        self.reset()
        self.fds["sockops"] = bpf_callback.load_func(b, "dp_sockops", BPF.SOCK_OPS).fd
        self.fds["msg"] = bpf_callback.load_func(b, "dp_msg_verdict", BPF.SK_MSG).fd
        self.fds["act"] = bpf_callback.load_func(b, "dp_msg_act", BPF.SK_MSG).fd
        b["dp_msg_prog"][ct.c_int(0)] = ct.c_int(self.fds["act"])  # dp_msg_verdict's second half
        self.fds["msg_in"] = bpf_callback.load_func(b, "dp_msg_in", BPF.SK_MSG).fd
        b["dp_msg_prog"][ct.c_int(1)] = ct.c_int(self.fds["msg_in"])  # the inbound decision
        if "-DDP_REWRITE=1" in cflags and synthesized:  # dp_rewrite.h's program
            self.fds["msg_rw"] = bpf_callback.load_func(b, "dp_msg_rw", BPF.SK_MSG).fd
            b["dp_msg_prog"][ct.c_int(2)] = ct.c_int(self.fds["msg_rw"])
            if "-DDP_INBOUND=1" in cflags:  # the inbound decision on the rewritten path
                self.fds["msg_rwin"] = bpf_callback.load_func(b, "dp_msg_rwin", BPF.SK_MSG).fd
                b["dp_msg_prog"][ct.c_int(3)] = ct.c_int(self.fds["msg_rwin"])
        self.fds["skb"] = bpf_callback.load_func(b, "dp_skb_verdict", BPF.SK_SKB).fd
        self.fds["rsp"] = bpf_callback.load_func(b, "dp_rsp_verdict", BPF.SK_SKB).fd
        b["dp_rsp_prog"][ct.c_int(0)] = ct.c_int(self.fds["rsp"])  # its own tail call
        self.fds["sockops_srv"] = bpf_callback.load_func(b, "dp_sockops_srv", BPF.SOCK_OPS).fd
        self.fds["srv_msg"] = bpf_callback.load_func(b, "dp_srv_verdict", BPF.SK_MSG).fd
        self.fds["inj_msg"] = bpf_callback.load_func(b, "dp_inj_verdict", BPF.SK_MSG).fd
        for name in ("dp_cli", "dp_up", "dp_peer", "dp_free", "dp_cfg", "dp_srv", "dp_pair_wait",
                     "dp_inj", "dp_tmo", "dp_tmo_armed"):
            self.fds[name] = bpfsys.table_fd(b, name)
        for name in ("dp_lr_busy", "l7fp_lr_gone"):  # LEAST_REQUEST's counts, when compiled in
            try:
                self.fds[name] = bpfsys.table_fd(b, name)
            except OSError:
                pass

    def _attach_maps(self, back: bool) -> None:
        """sk_msg/sk_skb verdict programs onto the module's SOCKHASHes."""
        self._attach(self.fds["msg"], self.fds["dp_cli"], bpfsys.SK_MSG_VERDICT, "sk_msg")
        self._attach(self.fds["skb"], self.fds["dp_up"], bpfsys.SK_SKB_VERDICT, "sk_skb")
        if back:  # Envoy's responses on client sockets: dp_return.h follows their framing
            self._attach(self.fds["rsp"], self.fds["dp_cli"], bpfsys.SK_SKB_VERDICT, "rsp_skb")
        self._attach(self.fds["srv_msg"], self.fds["dp_srv"], bpfsys.SK_MSG_VERDICT, "srv_msg")
        self._attach(self.fds["inj_msg"], self.fds["dp_inj"], bpfsys.SK_MSG_VERDICT, "inj_msg")

    def reset(self) -> None:
        """Empty the tables: a cached module may have served an earlier Datapath."""
        for name in ("dp_svc", "dp_peer", "dp_stats", "dp_cfg", "dp_iroutes", "dp_ihosts", "dp_replies", "dp_eps", "dp_ep_in",
                     "dp_pool_miss", "dp_pair_wait", "dp_rto", "dp_tmo", "dp_tmo_armed", "dp_ret",
                     "dp_rpol", "dp_retry", "dp_retry_busy", "dp_tcp_up", "dp_mpol", "dp_dpol", "dp_dly",
                     "dp_odc", "dp_odd", "dp_odh", "dp_lr_busy", "l7fp_lr_n", "l7fp_lr_gone"):
            try:
                self.bpf[name].clear()
            except KeyError:
                pass
        free_fd = bpfsys.table_fd(self.bpf, "dp_free")
        for pool in range(int(self.bpf["dp_free"].max_entries)):
            bpfsys.map_delete(free_fd, ct.c_uint32(pool))

    def _attach(self, prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
        link = bpfsys.link_create(prog_fd, target_fd, attach_type)
        if link >= 0:
            self.links.append((what, link))
            return
        bpfsys.prog_attach(prog_fd, target_fd, attach_type)
        self.legacy.append((prog_fd, target_fd, attach_type))

    def attach_cgroup(self, path: str | Path, role: str = "client") -> None:
        """Run sock_ops for the sockets of the cgroup v2 directory `path` (and below).

        role "client": track the pod's connections to meshed services;
        role "server": pair the pod's app with the agent's pooled upstreams.
        """
        key = f"{role}:{path}"
        if key in self.cgroups:
            return
        fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
        self.cgroups[key] = fd
        prog = self.fds["sockops" if role == "client" else "sockops_srv"]
        self._attach(prog, fd, bpfsys.CGROUP_SOCK_OPS, f"sock_ops:{key}")

    def detach_cgroup(self, path: str | Path, role: str = "client") -> None:
        key = f"{role}:{path}"
        fd = self.cgroups.pop(key, None)
        if fd is None:
            return
        for what, link in list(self.links):
            if what == f"sock_ops:{key}":
                os.close(link)
                self.links.remove((what, link))
        for item in list(self.legacy):
            if item[1] == fd:
                bpfsys.prog_detach(*item)
                self.legacy.remove(item)
        os.close(fd)

    # ---- maps -------------------------------------------------------------
    def set_service(self, ip: str, port: int, listener: int, gen: int = 0) -> None:
        """Destination ip:port is listener `listener` in plan generation `gen`
        (0: none there); sock_ops tracks client sockets of any listed destination."""
        t = self.bpf["dp_svc"]
        key = t.Key(ip=_ip_net(ip), port=port)
        val = t.get(key) or t.Leaf()
        val.lid[gen] = listener
        t[key] = val

    def remove_service(self, ip: str, port: int) -> None:
        t = self.bpf["dp_svc"]
        try:
            del t[t.Key(ip=_ip_net(ip), port=port)]
        except KeyError:
            pass

    def set_enabled(self, gen: int, enabled: bool = True, access_log: int = 1,
                    timeouts: bool = False) -> None:
        """Flip the active plan generation (the last step of a plan swap).
        `access_log`: 0 off, N: one access-log event for one request in N.
        `timeouts`: generation `gen` has route timeouts (set_route_timeouts)."""
        t = self.bpf["dp_cfg"]
        t[ct.c_int(0)] = t.Leaf(gen=gen, enabled=1 if enabled else 0,
                                access_log=max(0, int(access_log)), timeouts=int(timeouts))

    def set_route_timeouts(self, gen: int, timeouts: dict[int, int],
                           per_try: dict[int, int] | None = None) -> None:
        """Generation `gen`'s route timers: route id (dp_verdict.route) -> ms of
        the route timeout (`timeouts`) and of the retry policy's per-try timeout
        (`per_try`). Routes not listed have none."""
        t = self.bpf["dp_rto"]
        drop_generation(t, gen)
        tries = per_try or {}
        for route in set(timeouts) | set(tries):
            ms, try_ms = (min(max(int(d.get(route, 0)), 0), 2**32 - 1) for d in (timeouts, tries))
            if ms or try_ms:
                t[t.Key(gen=gen, route=route)] = t.Leaf(ms=ms, try_ms=try_ms)

    def set_inline_route(self, gen: int, index: int, kind: int, prefix: str, pool: int = 0,
                         reply_id: int = 0, status: int = 0, pools: tuple[int, ...] = (),
                         route_id: int = 0) -> None:
        """Route entry `index` of generation `gen` of the built-in decision
        (dp_decide_inline.h). FORWARD picks one of `pools` (or `pool`) at random."""
        t = self.bpf["dp_iroutes"]
        ps = pools or (pool,)
        if len(ps) > IPOOLS or index >= IROUTE_TOTAL:
            raise ValueError(f"inline route {index}: {len(ps)} pools (max {IPOOLS})")
        raw = prefix.encode()
        if len(raw) > 32:
            raise ValueError(f"inline route {index}: prefix longer than 32 bytes: {prefix!r}")
        leaf = t.Leaf(used=1, kind=kind, npools=len(ps), reply_id=reply_id, status=status,
                      plen=len(raw), route_id=route_id or index + 1)
        for i, p in enumerate(ps):
            leaf.pools[i] = p
        leaf.prefix = raw
        t[ct.c_int(gen * IROUTE_TOTAL + index)] = leaf

    def set_inline_vhost(self, gen: int, listener: int, host: str | None, base: int,
                         count: int) -> None:
        """Virtual host of `listener` for Host `host` (None: the "*" entry): route
        entries base..base+count-1 of generation `gen`."""
        t = self.bpf["dp_ihosts"]
        h, n = (fnv1a(host.lower().encode()), len(host.encode())) if host is not None else (0, 0)
        t[t.Key(gen=gen, listener=listener, hash=h, len=n)] = t.Leaf(base=base, n=count)

    def clear_inline(self, gen: int) -> None:
        """Empty generation `gen` of the built-in decision's tables."""
        t = self.bpf["dp_iroutes"]
        for i in range(IROUTE_TOTAL):
            t[ct.c_int(gen * IROUTE_TOTAL + i)] = t.Leaf()
        hosts = self.bpf["dp_ihosts"]
        drop_generation(hosts, gen)

    def set_reply(self, reply_id: int, data: bytes) -> None:
        """Kernel reply `reply_id` of the built-in decision: a whole HTTP response."""
        t = self.bpf["dp_replies"]
        leaf = t.Leaf()
        if not 0 < len(data) <= len(leaf.data):
            raise ValueError(f"reply {reply_id}: {len(data)} bytes, limit {len(leaf.data)}")
        leaf.len = len(data)
        ct.memmove(leaf.data, data, len(data))
        t[ct.c_int(reply_id)] = leaf

    def ensure_pool(self, pool: int, depth: int) -> int:
        """The free-socket queue of endpoint pool `pool`, created on first use."""
        fd = self.pool_maps.get(pool)
        if fd is None:
            fd = bpfsys.queue_create(f"l7fp_pool{pool}", 8, depth)
            bpfsys.map_update(self.fds["dp_free"], ct.c_uint32(pool), ct.c_uint32(fd))
            self.pool_maps[pool] = fd
        return fd

    def announce_pair(self, sock: socket.socket, app_port: int) -> int:
        """Before connecting `sock` (bound, same netns as the app): let sock_ops
        pair the app's accepted end with it. Returns the socket's cookie.
        Raw map calls: the pool's refill makes thousands of these a second."""
        cookie = socket_cookie(sock)
        bpfsys.map_update(self.fds["dp_pair_wait"], _pair_key(sock, app_port),
                          ct.c_uint64(cookie))
        return cookie

    def pair_pending(self, sock: socket.socket, app_port: int) -> bool:
        """True while the pair announced for `sock` is not made; `withdraw` ends the wait."""
        return bpfsys.map_has(self.fds["dp_pair_wait"], _pair_key(sock, app_port), 8)

    def withdraw_pair(self, sock: socket.socket, app_port: int) -> None:
        bpfsys.map_delete(self.fds["dp_pair_wait"], _pair_key(sock, app_port))

    def add_upstream(self, sock: socket.socket) -> int:
        """Put a connected upstream socket into dp_up; returns its cookie."""
        cookie = socket_cookie(sock)
        bpfsys.map_update(self.fds["dp_up"], ct.c_uint64(cookie), ct.c_uint32(sock.fileno()))
        return cookie

    def push_free(self, pool: int, cookie: int) -> None:
        """Offer upstream `cookie` to pool `pool` (a queue push)."""
        bpfsys.queue_push(self.pool_maps[pool], ct.c_uint64(cookie))

    def pop_free(self, pool: int) -> int | None:
        return bpfsys.queue_pop(self.pool_maps[pool])

    def open_events(self, callback: Any) -> None:
        """Deliver dp_events to `callback(ctx, data, size)`. A cached module's ring
        buffer can be opened only once, so later Datapaths re-point its sink."""
        sink = getattr(self.bpf, "_l7fp_event_sink", None)
        if sink is None:
            sink = [callback]
            self.bpf["dp_events"].open_ring_buffer(lambda c, d, n: sink[0](c, d, n))
            self.bpf._l7fp_event_sink = sink
        sink[0] = callback

    def open_mirror_events(self, callback: Any) -> bool:
        """Deliver the mirror copies (dp_mirror_rb, only with -DDP_MIRROR=1) to
        `callback(ctx, data, size)`; False when the module has none. Polled with
        dp_events by the same ring_buffer_poll."""
        sink = getattr(self.bpf, "_l7fp_mirror_sink", None)
        if sink is None:
            try:
                table = self.bpf["dp_mirror_rb"]
            except KeyError:
                return False
            sink = [callback]
            table.open_ring_buffer(lambda c, d, n: sink[0](c, d, n))
            self.bpf._l7fp_mirror_sink = sink
        sink[0] = callback
        return True

    def pool_misses(self, pools: list[int] | None = None) -> dict[int, int]:
        """Times sk_msg found each pool empty (monotonic counters); `pools`: only
        these (one lookup each instead of a walk over all DP_MAX_POOLS entries,
        which cost the agent ~0.4 ms per look)."""
        t = self.bpf["dp_pool_miss"]
        if pools is None:
            return {int(k.value): int(v.value) for k, v in t.items() if v.value}
        return {p: int(t[ct.c_int(p)].value) for p in pools}

    def drop_peer(self, cookie: int) -> None:
        """Forget upstream `cookie` (closed by the agent): its client binding,
        the timed request in flight on it, its retry record and its unpaired mark."""
        key = ct.c_uint64(cookie)
        bpfsys.map_delete(self.fds["dp_peer"], key)
        bpfsys.map_delete(self.fds["dp_tmo_armed"], key)
        bpfsys.map_delete(self.fds["dp_tmo"], key)
        for name in ("dp_retry", "dp_tcp_up", "dp_dly"):
            bpfsys.table_delete(self.bpf[name], cookie)
        self._lr_end(key)

    def _lr_end(self, up: ct.c_uint64) -> None:
        """A LEAST_REQUEST request in flight on upstream `up` ends with it: taken
        back in l7fp_lr_gone (dp_decide_l7fp.h), if the kernel has not taken it
        back first (the record's lookup-and-delete is one step: either side
        takes it, once). l7fp_lr_gone's only writer is this method, under a
        lock: a read and a write, not an atomic add."""
        if not self.counts_least_request():
            return
        slot = ct.c_uint32()
        if bpfsys.lib().bpf_map_lookup_and_delete_elem(self.fds["dp_lr_busy"], ct.byref(up),
                                                       ct.byref(slot)) != 0:
            return  # no request counted on U, or the kernel's path took it back
        gone, fd = ct.c_uint64(), self.fds["l7fp_lr_gone"]
        with self._lr_mu:
            if bpfsys.lib().bpf_map_lookup_elem(fd, ct.byref(slot), ct.byref(gone)) == 0:
                gone.value += 1
                bpfsys.map_update(fd, slot, gone)

    def counts_least_request(self) -> bool:
        """True when the program counts LEAST_REQUEST's requests in flight
        (compiled with -DL7FP_F_LEAST_REQUEST=1)."""
        return "dp_lr_busy" in self.fds

    def lr_in_flight(self) -> dict[int, int]:
        """LEAST_REQUEST's requests in flight per counter slot (only nonzero
        ones; empty without the counts compiled in): the tests' leak check."""
        try:
            n, gone = self.bpf["l7fp_lr_n"], self.bpf["l7fp_lr_gone"]
        except KeyError:
            return {}
        def ints(table: Any) -> dict[int, int]:
            # batch lookups: a few syscalls for the 2 x clusters x 64 slots, not one per slot
            return {int(getattr(k, "value", k)): int(getattr(v, "value", v))
                    for k, v in table.items_lookup_batch()}

        g = ints(gone)
        out = {}
        for k, v in ints(n).items():
            d = (v - g.get(k, 0)) & (2**64 - 1)
            if d:
                out[k] = d - 2**64 if d >= 2**63 else d
        return out

    def mark_tcp(self, cookie: int) -> None:
        """Upstream `cookie` is not paired (its bytes take TCP and sk_skb):
        requests of routes with retries bound to it go to Envoy."""
        t = self.bpf["dp_tcp_up"]
        t[t.Key(cookie)] = t.Leaf(1)

    def take_upstream(self, cookie: int) -> None:
        """Take upstream `cookie` off every way (timed out): no byte of its late
        response reaches the client, the client's next request finds it gone
        (and goes to Envoy). The caller closes the socket."""
        key = ct.c_uint64(cookie)
        for name in ("dp_peer", "dp_srv", "dp_up"):
            bpfsys.map_delete(self.fds[name], key)

    def unload(self) -> None:
        """Close and free the module instance (its maps and programs) and drop it
        from the cache, and the compiled code when no instance uses it any more:
        for a node rebuilt with other cflags, so that plan changes do not pile
        up modules in a long-running agent."""
        self.close()
        unused = []
        with _CACHE_LOCK:
            for key in [k for k, v in _CACHE.items() if v is self.bpf]:
                del _CACHE[key]
            template = getattr(self.bpf, "template", None)
            if template is not None and not any(getattr(v, "template", None) is template
                                                for v in _CACHE.values()):
                for code in [k for k, v in _COMPILED.items() if v is template]:
                    del _COMPILED[code]  # its last instance: the compiled code goes too
                unused.append(template)
        for module in [self.bpf, *unused]:
            try:
                module.cleanup()
            except Exception as exc:  # best effort: the fds go with the process anyway
                log.warning("unloading a datapath module: %s", exc)

    def close(self) -> None:
        """Detach everything this datapath attached (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _what, link in self.links:
            try:
                os.close(link)
            except OSError:
                pass
        self.links.clear()
        for prog_fd, target_fd, attach_type in self.legacy:
            try:
                bpfsys.prog_detach(prog_fd, target_fd, attach_type)
            except OSError as exc:
                log.warning("detach failed: %s", exc)
        self.legacy.clear()
        for fd in self.cgroups.values():
            os.close(fd)
        self.cgroups.clear()
        for fd in self.pool_maps.values():
            os.close(fd)
        self.pool_maps.clear()


class PairKey(ct.Structure):
    """struct dp_pair_key (datapath.h)."""

    _fields_ = [("netns", ct.c_uint64), ("up_port", ct.c_uint32), ("app_port", ct.c_uint32)]


def _pair_key(sock: socket.socket, app_port: int) -> PairKey:
    netns = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    return PairKey(netns, sock.getsockname()[1], app_port)


def fnv1a(data: bytes) -> int:
    """64-bit FNV-1a, as dp_decide_inline.h hashes the Host value."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _ip_net(ip: str) -> int:
    """An IPv4 address as the u32 the kernel stores (network order, read natively)."""
    return int.from_bytes(socket.inet_aton(ip), "little")
