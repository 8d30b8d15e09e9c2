"""The agent's half of request mirroring (the kernel half: bpf_src/dp_mirror.h).

Owner: the mirror part of K2. One `Mirrorer` per node datapath
(`fastpath.agent_node`): `program()` at each plan apply (plans thread, the
node's lock held), `on_event()` for a DP_EV_MIRROR record (event thread),
`close()` when the node closes. It owns its sender threads and their sockets.

The kernel posts a copy of each forwarded request that a route's mirror
policies sampled (the whole request: a cluster_header policy's header may be
anywhere in the head). A cluster_header policy's cluster is chosen here, per
copy, from the first value of that header, as Envoy's router does. `on_event` turns it into the shadow (fastpath.mirror:
`-shadow` host, the primary destination's inbound header insert cut out) and
queues one send per sampled policy, on a bounded queue: when it is full the
shadow is dropped and counted, never waited for (the client's request is
already on its way to the primary; its answer never depends on a shadow).

Senders send the shadow the way the node's Envoy sidecar would: from inside
the pod's network namespace, to an endpoint of the mirror cluster (round
robin), on a socket created with the sidecar's uid (1337) so that the pod's
outbound interception lets it pass and the destination's inbound sidecar
(its policy) sees it as it sees Envoy's shadows. The response is read to its
end and discarded; connections are kept alive per endpoint.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import logging
import queue
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastpath.loader import drop_generation
from fastpath.mirror import (
    MIRRORS_MAX,
    header_cluster,
    shadow_request,
    shadows_like_envoy,
)
from fastpath.mirror_send import SenderConns, Shadow
from fastpath.plan import ClusterAction, KernelPlan, MirrorPolicy, Verdict

log = logging.getLogger(__name__)

DP_EV_MIRROR = 6  # dp_mirror.h
MIRROR_MAX = 4096  # DP_MIRROR_MAX
SIDECAR_UID = 1337  # the pod's interception lets this uid's sockets pass (mesh.netrules)
QUEUE_MAX = 256  # shadows waiting for a sender; more are dropped (counted)
SENDERS = 4
DEFAULT_TIMEOUT_S = 15.0  # Envoy's default route timeout, also the shadow's
# Shadows one sender has in flight at once, each on its own kept-alive
# connection (fastpath.mirror_send; benchmarks/mirror_senders.py)
BATCH = 16


class MirrorEv(ct.Structure):
    """Mirror of struct dp_mirror_ev (dp_mirror.h)."""

    _fields_ = [("kind", ct.c_uint32), ("route", ct.c_uint32), ("gen", ct.c_uint32),
                ("mask", ct.c_uint32), ("len", ct.c_uint32), ("cut_at", ct.c_uint32),
                ("cut_len", ct.c_uint32), ("_pad", ct.c_uint32),
                ("req", ct.c_uint8 * MIRROR_MAX)]


HEAD_SIZE = MirrorEv.req.offset  # a record is this header + the request's bytes


def needs_mirror(plan: KernelPlan) -> bool:
    """True when a KERNEL route of `plan` mirrors: the node's program is then
    compiled with -DDP_MIRROR=1."""
    return any(isinstance(r.action, ClusterAction) and r.action.mirrors
               and r.verdict is Verdict.KERNEL
               for lst in plan.listeners for vh in lst.virtual_hosts for r in vh.routes)


Endpoints = tuple[tuple[str, int], ...]


def _enter(netns: str | None) -> Any:
    """A NetnsSwitch of this thread inside `netns`, or None (logged) when it
    cannot enter: the sender then counts its shadows send_failed."""
    from fastpath.pools import NetnsSwitch

    sw = NetnsSwitch()
    try:
        sw.enter(netns)
    except OSError as exc:
        log.error("mirror: cannot enter %s: %s; shadows dropped", netns, exc)
        return None
    return sw


def header_targets(plan: KernelPlan) -> dict[str, Endpoints]:
    """Endpoints of each cluster of `plan` the agent shadows to as Envoy would."""
    return {c.name: () if c.original_dst else tuple((e.address, e.port) for e in c.endpoints)
            for c in plan.clusters if shadows_like_envoy(c)}


_HEAD = struct.Struct("=8I")  # struct dp_mirror_ev up to req


def parse_record(raw: bytes) -> tuple[int, int, int, bytes]:
    """(gen, route, mask, request) of a dp_mirror_rb record (the header, then as
    many bytes of the request as `len` says), the request without the primary
    destination's inbound header insert. Raises ValueError on a short record."""
    if len(raw) < _HEAD.size:
        raise ValueError(f"mirror record of {len(raw)} bytes")
    _kind, route, gen, mask, n, at, cut, _pad = _HEAD.unpack_from(raw)
    req = raw[_HEAD.size:_HEAD.size + min(n, MIRROR_MAX)]
    if cut and at + cut <= len(req):
        req = req[:at] + req[at + cut:]
    return gen, route, mask, req


@dataclass(frozen=True)
class RoutePolicies:
    mirrors: tuple[MirrorPolicy, ...]
    targets: tuple[Endpoints, ...]  # per policy: its cluster's endpoints (cluster_header: ())
    timeout_s: float
    # cluster name -> endpoints of every cluster of the plan a cluster_header
    # policy may name (fastpath.mirror.shadows_like_envoy; ORIGINAL_DST: none)
    by_name: dict[str, Endpoints] | None = None


class Mirrorer:
    def __init__(self, dp: Any, netns: str | None, ip: str | None = None,
                 senders: int = SENDERS, queue_max: int = QUEUE_MAX,
                 uid: int | None = SIDECAR_UID, batch: int = BATCH) -> None:
        self.dp = dp
        self.netns = netns
        self.ip = ip  # the pod's address: Envoy appends it to a shadow's x-forwarded-for
        self.uid = uid if netns else None  # only a pod's interception needs it
        self.routes: dict[tuple[int, int], RoutePolicies] = {}  # (gen, route id + 1)
        self.rr: dict[tuple[str, int], itertools.count[int]] = {}
        self.q: queue.Queue[Shadow | None] = queue.Queue(maxsize=queue_max)
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()  # stats from several threads
        self.n_senders = senders
        self.batch = max(1, batch)  # shadows a sender takes per wake-up (fastpath.mirror_send)
        self.threads: list[threading.Thread] = []

    # ---- plan (agent_synth.program) ------------------------------------------
    def program(self, plan: KernelPlan, sp: Any, gen: int) -> None:
        """Write generation `gen` of dp_mpol from the plan's KERNEL routes."""
        t = self.dp.bpf["dp_mpol"]
        drop_generation(t, gen)
        self.routes = {k: v for k, v in self.routes.items() if k[0] != gen}
        by_name: dict[str, Endpoints] | None = None  # the plan's, built once if a route needs it
        for rid, r in enumerate(getattr(sp, "routes", ())):
            if r is None or r.verdict is not Verdict.KERNEL or not isinstance(r.action, ClusterAction):
                continue
            mirrors = r.action.mirrors[:MIRRORS_MAX]
            if not mirrors:
                continue
            targets = tuple(tuple((e.address, e.port) for e in c.endpoints) if (c := plan.cluster(m.cluster))
                            else () for m in mirrors)
            timeout = (r.action.timeout_ms / 1000.0) if r.action.timeout_ms else DEFAULT_TIMEOUT_S
            named = any(m.cluster_header for m in mirrors)
            if named and by_name is None:
                by_name = header_targets(plan)
            self.routes[(gen, rid + 1)] = RoutePolicies(mirrors, targets, timeout,
                                                        by_name if named else None)
            leaf = t.Leaf()
            leaf.n = len(mirrors)
            for i, m in enumerate(mirrors):
                leaf.per_million[i] = m.per_million
            t[t.Key(gen=gen, route=rid + 1)] = leaf
        if self.routes and not self.threads:
            self._start()

    # ---- events (agent thread) --------------------------------------------------
    def on_event(self, data: Any, size: int) -> None:
        """A DP_EV_MIRROR record of dp_mirror_rb (`size` bytes: the header and
        the request): queue one shadow per sampled policy. Kept short: this is
        the thread of every event of the node (closes, retries)."""
        try:
            gen, route, mask, req = parse_record(ct.string_at(data, size))
        except ValueError:
            self._count("bad_copy")
            return
        pol = self.routes.get((gen, route))
        if pol is None:
            self._count("no_policy")  # a plan flipped since: Envoy's config moved on too
            return
        for i, m in enumerate(pol.mirrors):
            if not mask & (1 << i):
                continue
            cluster, eps = m.cluster, pol.targets[i]
            if m.cluster_header:
                cluster, eps = self._by_header(m.cluster_header, req, pol)
                if not cluster:
                    continue
            target = self._pick(cluster, eps)
            if target is None:
                self._count("no_endpoint")
                continue
            try:
                self.q.put_nowait(Shadow(target[0], target[1], req, m.host_suffix, pol.timeout_s))
                self._count("queued")
            except queue.Full:
                self._count("dropped_queue_full")

    def _by_header(self, header: str, req: bytes, pol: RoutePolicies) -> tuple[str, Endpoints]:
        """The cluster a cluster_header policy names in this copy, and its
        endpoints; ("", ()) and counted when Envoy would send nothing: no
        header or an empty value (`no_cluster_header`), a name that is no
        cluster of the plan (`unknown_cluster`; Envoy logs it at debug level
        only). A cluster the kernel path cannot shadow to never gets here: its
        name is a guard entry before the route (fastpath.mirror)."""
        name = header_cluster(req, header)
        if name is None:
            self._count("no_cluster_header")
            return "", ()
        eps = (pol.by_name or {}).get(name)
        if eps is None:
            self._count("unknown_cluster")
            return "", ()
        return name, eps

    def _pick(self, cluster: str, eps: tuple[tuple[str, int], ...]) -> tuple[str, int] | None:
        if not eps:
            return None
        key = (cluster, len(eps))
        return eps[next(self.rr.setdefault(key, itertools.count())) % len(eps)]

    def _count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    # ---- senders -------------------------------------------------------------------
    def _start(self) -> None:
        for i in range(self.n_senders):
            th = threading.Thread(target=self._sender, name=f"l7fp-mirror-{i}", daemon=True)
            th.start()
            self.threads.append(th)

    def _sender(self) -> None:
        sw = _enter(self.netns)  # this thread only (setns is per thread)
        conns = SenderConns(self._connect, self._count)
        stop = False
        while not stop:
            batch, stop = self._take()
            if sw is None:
                for _ in batch:
                    self._count("send_failed")
                continue
            conns.send_batch([x for sh in batch if (x := self._shadow_bytes(sh)) is not None])
        conns.close()
        if sw is not None:
            sw.close()

    def _take(self) -> tuple[list[Shadow], bool]:
        """The next shadow (waits), and up to `batch` - 1 more already queued
        (never waits for them); True when close() asked this sender to stop."""
        out: list[Shadow] = []
        item = self.q.get()
        while item is not None:
            out.append(item)
            if len(out) >= self.batch:
                return out, False
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return out, False
        return out, True

    def _shadow_bytes(self, sh: Shadow) -> tuple[Shadow, bytes] | None:
        try:
            return sh, shadow_request(sh.req, sh.host_suffix, self.ip)
        except ValueError as exc:
            self._count("bad_copy")
            log.warning("mirror: %s", exc)
            return None

    def _connect(self, sh: Shadow) -> socket.socket:
        """A socket owned by the sidecar's uid (the interception's exception):
        fsuid is per thread, and socket() records it in the socket's file."""
        libc = ct.CDLL(None, use_errno=True)
        if self.uid is not None:
            libc.setfsuid(self.uid)
            libc.setfsgid(self.uid)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if self.uid is not None:
                libc.setfsuid(0)
                libc.setfsgid(0)
        try:
            s.settimeout(min(sh.timeout_s, 5.0))
            s.connect((sh.address, sh.port))
        except OSError:
            s.close()
            raise
        return s

    # ---- views / shutdown --------------------------------------------------------------
    def debug(self) -> dict[str, Any]:
        with self.lock:
            return {"queued_now": self.q.qsize(), **self.stats}

    def close(self) -> None:
        """Stop the senders (shadows still queued are dropped)."""
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            try:
                self.q.put(None, timeout=1.0)
            except queue.Full:
                break
        deadline = time.monotonic() + 1.0  # a sender waiting on a slow mirror is a daemon
        for th in self.threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        self.threads = []
