"""Synthesis: KernelPlan -> the -D flags and map contents of the kernel decision.

Owned by the decision engine (K1). Called by the agent (K2) for every new plan,
and by tests/kernel_decide. Only the features a plan uses are compiled in
(L7FP_F_* switches) and the loop bounds are sized to the plan (L7FP_MAX_*,
rounded up to powers of two so that similar plans share one compiled program).

Anything the C decision cannot enforce exactly is written as a *punt* entry
(the route hands its requests to Envoy) or a punted listener, and noted in
`SynthesizedProgram.notes`: the kernel may always hand a request to Envoy,
never decide it differently (DESIGN.md section 4).
"""

from __future__ import annotations

import ctypes
import http
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastpath import bpf_structs as bs
from fastpath.plan import (
    SHARED_BUCKET_REASON,
    ClusterAction,
    DirectResponse,
    HeaderMatch,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    Route,
    StringKind,
    Verdict,
    VirtualHost,
)

INCLUDE = Path(__file__).resolve().parent.parent / "bpf_src" / "include"
HEADERS = ("l7fp_defs.h", "l7fp_maps.h", "l7fp_http.h", "l7fp_dfa.h", "l7fp_match.h", "l7fp_rbac.h",
           "l7fp_query.h", "l7fp_decide.h")
FAULT_BODY = "fault filter abort"
RATE_LIMITED_BODY = "local_rate_limited"
# the reference model's set of path bytes the kernel matches without normalisation
SAFE_TARGET = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/?=&+:@!$'()*,;")
TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Caps on the loop bounds: the worst program they allow (every feature, 64
# domains, 16 routes, 64-byte strings, 16 RBAC rows, 4 header matchers, 8
# weighted clusters) is 683 k verifier instructions here (limit 1 M). Beyond a
# cap the synthesis punts (a route, the rest of a virtual host, or a listener).
MAX_STR_CAP = 64
MAX_DOMAINS_CAP = 64
MAX_ROUTES_CAP = 16
MAX_RBAC_CAP = 16
MAX_HMATCH_CAP = 4
MAX_WEIGHTED_CAP = 8
MAX_NAME = 24  # names are keyed by length, first/last 8 bytes (+ 8 middle ones over 16 bytes)


def decide_text() -> str:
    """All K1 headers pasted in order, their own #includes removed.

    BCC rewrites `map.lookup()` only in the main source text, so a program that
    uses l7fp_decide pastes this text instead of #including the headers."""
    inc = re.compile(r'^#include "l7fp_[a-z_]+\.h"\s*$', re.M)
    return "\n".join(f"/* ---- {h} ---- */\n" + inc.sub("", (INCLUDE / h).read_text())
                     for h in HEADERS)


def cclass_table() -> bytes:
    """The 256-byte class table (L7FP_C_* bits) the scanner reads."""
    out = bytearray(256)
    for b in range(256):
        ch, bits = chr(b), 0
        bits |= (ch in TCHARS) << bs.C_TCHAR
        bits |= (b == 9 or 32 <= b < 127 or b >= 128) << bs.C_VALUE
        bits |= (ch in SAFE_TARGET) << bs.C_TARGET
        bits |= ("A" <= ch <= "Z") << bs.C_UPPER
        bits |= (b == 32) << bs.C_SP
        bits |= (ch == ":") << bs.C_COLON
        bits |= (ch == "?") << bs.C_QMARK
        bits |= (ch in "%\\") << bs.C_PCT
        out[b] = bits
    return bytes(out)


def reply_bytes(status: int, body: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The whole HTTP/1.1 response the kernel sends for a REPLY; ``headers``:
    extra (name, value) lines (a rate limit's response_headers_to_add)."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    data = body.encode()
    head = f"HTTP/1.1 {status} {phrase}\r\ncontent-length: {len(data)}\r\n"
    if data:
        head += "content-type: text/plain\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode() + b"\r\n" + data


def name_key(name: str, long_names: bool = False) -> tuple[int, int, int, int]:
    """(len, w0, w1, w2) of a lower-case header name, as l7fp_parse_header keys it
    (w2 only in a program with L7FP_F_LONG_NAMES)."""
    raw = name.lower().encode()
    w0 = int.from_bytes(raw[:8].ljust(8, b"\0"), "little")
    w1 = int.from_bytes(raw[-8:], "little") if len(raw) > 8 else 0
    w2 = int.from_bytes(raw[8:8 + min(8, len(raw) - 16)], "little") \
        if long_names and len(raw) > 16 else 0
    return len(raw), w0, w1, w2


def _pow2(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


class Punt(Exception):
    """A plan element the C decision cannot enforce: it becomes a punt entry."""


@dataclass
class SynthesizedProgram:
    """What the agent needs for one plan: flags to compile, tables to write."""

    cflags: tuple[str, ...]
    knobs: dict[str, int]
    listener_ids: dict[str, int]
    cluster_ids: dict[str, int]
    route_names: tuple[str, ...]
    notes: tuple[str, ...]
    rows: dict[str, list[bytes]] = field(repr=False)
    slots: dict[str, int] = field(repr=False)
    # plan.Route per route id (route_names' order; None for a filler punt): the
    # agent reads per-route data the decision does not carry (retry policies)
    routes: tuple[Any, ...] = field(default=(), repr=False)
    route_timeouts: dict[int, int] = field(default_factory=dict)  # route index -> timeout ms
    rewrites: dict[int, bytes] = field(default_factory=dict, repr=False)  # route id -> dp_rw
    # cluster name -> l7fp_replies index of Envoy's 503 "no healthy upstream"
    # (fastpath.agent_outlier writes it into the cluster's dp_odc record)
    no_healthy: dict[str, int] = field(default_factory=dict)

    def tables(self, gen: int) -> dict[str, dict[bytes, bytes]]:
        """Map name -> {key: value} for plan generation `gen` (0 or 1)."""
        out: dict[str, dict[bytes, bytes]] = {}
        for name, rows in self.rows.items():
            n = self.knobs[_SIZE_KNOB[name]] if name in _SIZE_KNOB else len(rows)
            out[name] = {struct.pack("<I", (gen & 1) * n + i): v for i, v in enumerate(rows)}
        out["l7fp_cclass"] = {struct.pack("<I", 0): cclass_table()}
        long_names = bool(self.knobs.get("L7FP_F_LONG_NAMES"))
        keys = {nm: name_key(nm, long_names) for nm in self.slots}
        out["l7fp_hnames"] = {
            bytes(bs.HnameKey(keys[nm][0], gen & 1, *keys[nm][1:])):
                struct.pack("<I", slot) for nm, slot in self.slots.items()}
        # round-robin counters start at 0 (the arrays are zero-filled already)
        return out


_SIZE_KNOB = {
    "l7fp_listeners": "L7FP_N_LISTENERS", "l7fp_domains": "L7FP_N_DOMAINS",
    "l7fp_vhosts": "L7FP_N_VHOSTS", "l7fp_routes": "L7FP_N_ROUTES",
    "l7fp_hmatch": "L7FP_N_HMATCH", "l7fp_weighted": "L7FP_N_WEIGHTED",
    "l7fp_clusters": "L7FP_N_CLUSTERS", "l7fp_replies": "L7FP_N_REPLIES",
    "l7fp_hdradds": "L7FP_N_HDRADDS", "l7fp_buckets": "L7FP_N_BUCKETS",
    "l7fp_rbac": "L7FP_N_RBAC", "l7fp_dfas": "L7FP_N_DFAS", "l7fp_qmatch": "L7FP_N_QMATCH",
}


def synthesize(plan: KernelPlan, max_hdr: int = 512,
               floor: dict[str, int] | None = None) -> SynthesizedProgram:
    """Synthesize the kernel decision of `plan` (pure; no BPF calls).

    `max_hdr`: head bytes the parser looks at (power of two; verifier cost grows
    with it). `floor`: knob minimums, e.g. to make many plans share one compiled
    program (tests do this)."""
    from fastpath.synth_tables import TableBuilder

    tb = TableBuilder(plan)
    tb.build()
    knobs = tb.knobs(max_hdr)
    for k, v in (floor or {}).items():
        knobs[k] = max(knobs.get(k, 0), v)
    knobs["L7FP_N_QMATCH"] = max(knobs["L7FP_N_QMATCH"],
                                 knobs["L7FP_N_ROUTES"] * knobs["L7FP_MAX_QMATCH"])
    tb.query_table(knobs["L7FP_MAX_QMATCH"], knobs["L7FP_N_QMATCH"])
    st = bs.structs(knobs)
    rows = tb.encode(st)
    return SynthesizedProgram(
        cflags=tuple(f"-D{k}={v}" for k, v in sorted(knobs.items())),
        knobs=knobs, listener_ids=dict(tb.listener_ids), cluster_ids=dict(tb.cluster_ids),
        route_names=tuple(tb.route_names), notes=tuple(tb.notes), rows=rows,
        slots=dict(tb.slots), routes=tuple(tb.routes), route_timeouts=dict(tb.route_timeouts),
        rewrites=dict(tb.rewrites), no_healthy=dict(tb.no_healthy))


def executable_plan(plan: KernelPlan) -> KernelPlan:
    """``plan`` with every KERNEL route the synthesized decision would punt made ENVOY.

    Called by `fastpath.split.plan_of`, so the split's verdicts, its coverage
    and the residual (which drops the rate limiters of KERNEL routes) all
    describe what the kernel executes, not only what the plan can express: a
    route the decision punts (a query-parameter matcher, a redirect, a table
    cap) reaches Envoy, which must then still own its limiter.
    """
    from fastpath.synth_tables import TableBuilder

    tb = TableBuilder(plan)
    tb.build()
    listeners = []
    for lp in plan.listeners:
        vhosts, changed = [], False
        for vh in lp.virtual_hosts:
            routes = []
            for r in vh.routes:
                if r.verdict is Verdict.KERNEL and id(r) not in tb.kernel_routes:
                    why = tb.punt_reasons.get(id(r), "not synthesized")
                    r = replace(r, verdict=Verdict.ENVOY, reason=f"kernel decision: {why}")
                    changed = True
                routes.append(r)
            vhosts.append(replace(vh, routes=tuple(routes)))
        lp = replace(lp, virtual_hosts=tuple(vhosts))
        if changed and lp.local_rate_limit is not None and lp.verdict is Verdict.KERNEL:
            # One owner per bucket (as fastpath.classify decides it): Envoy keeps it.
            lp = replace(lp, verdict=Verdict.ENVOY, reason=SHARED_BUCKET_REASON, virtual_hosts=tuple(
                replace(vh, routes=tuple(r if r.verdict is Verdict.ENVOY else
                                         replace(r, verdict=Verdict.ENVOY, reason=SHARED_BUCKET_REASON)
                                         for r in vh.routes)) for vh in lp.virtual_hosts))
        listeners.append(lp)
    return replace(plan, listeners=tuple(listeners))


def encode_str(st: bs.Structs, s: str, ci: bool = False) -> ctypes.Structure:
    """A table string (struct l7fp_str) with its word masks."""
    raw = (s.lower() if ci else s).encode()
    v = st.Str()
    ms = len(v.b)
    if len(raw) > ms:
        raise Punt(f"string longer than {ms} bytes: {s[:40]!r}")
    v.len = len(raw)
    v.flags = bs.STR_CI if ci else 0
    v.ci = 0xFFFFFFFFFFFFFFFF if ci else 0
    for k in range(ms // 8):
        n = max(0, min(8, len(raw) - 8 * k))
        v.m[k] = (1 << (8 * n)) - 1
    for i, b in enumerate(raw):
        v.b[i] = b
    return v


__all__ = [
    "ClusterAction", "DirectResponse", "HeaderMatch", "LbPolicy", "ListenerPlan",
    "LocalRateLimit", "PathKind", "Punt", "Route", "StringKind", "SynthesizedProgram",
    "Verdict", "VirtualHost", "cclass_table", "decide_text", "encode_str", "name_key",
    "reply_bytes", "synthesize",
]
