"""ctypes mirrors of the C structs in bpf_src/include/l7fp_defs.h.

Owned by the decision engine (K1). `fastpath.synth` builds table values with
them; the agent (K2) and the tests read decisions with them. The layouts depend
on the size knobs (-D flags), so `structs(knobs)` builds one set of classes per
knob set. tests/kernel_decide/test_layout.py checks every class against the
layout clang gives the C struct (through BCC's own map types).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# -D knob defaults, as the #ifndef blocks of l7fp_defs.h set them.
DEFAULT_KNOBS: dict[str, int] = {
    "L7FP_MAX_HDR": 512,
    "L7FP_MAX_LINES": 32,
    "L7FP_MAX_HOST": 128,
    "L7FP_MAX_STR": 64,
    "L7FP_MAX_BLOB": 256,
    "L7FP_MAX_DOMAINS": 16,
    "L7FP_MAX_ROUTES": 16,
    "L7FP_MAX_HMATCH": 4,
    "L7FP_MAX_WEIGHTED": 8,
    "L7FP_MAX_SLOTS": 8,
    "L7FP_MAX_ABSENT": 4,
    "L7FP_MAX_RBAC": 16,
    "L7FP_N_RBAC": 16,
    "L7FP_F_RBAC": 1,
    "L7FP_N_LISTENERS": 16,
    "L7FP_N_DOMAINS": 64,
    "L7FP_N_VHOSTS": 32,
    "L7FP_N_ROUTES": 64,
    "L7FP_N_HMATCH": 16,
    "L7FP_N_WEIGHTED": 16,
    "L7FP_N_CLUSTERS": 32,
    "L7FP_N_REPLIES": 16,
    "L7FP_N_HDRADDS": 16,
    "L7FP_N_BUCKETS": 16,
    "L7FP_F_HDR_MATCH": 1,
    "L7FP_F_WEIGHTED": 1,
    "L7FP_F_RATE_LIMIT": 1,
    "L7FP_F_FAULT": 1,
    "L7FP_F_WILDCARD": 1,
    "L7FP_F_HDR_ADD": 1,
    "L7FP_F_QUERY": 0,  # l7fp_query.h: compiled in only for a plan with a query matcher
    "L7FP_F_LEAST_REQUEST": 0,  # in-flight counts: a plan with a LEAST_REQUEST cluster of 2+
    "L7FP_LR_EPS": 64,
}

# Verdicts and PASS reasons (l7fp_defs.h).
FORWARD, REPLY, NEED_MORE, PASS = 1, 2, 3, 4
VERDICT_NAMES = {FORWARD: "FORWARD", REPLY: "REPLY", NEED_MORE: "NEED_MORE", PASS: "PASS"}
REASONS = (
    "none", "unparsed", "chunked", "upgrade", "http10", "h2", "too_large", "punt_route",
    "pool_empty", "expect", "bad_cl", "no_listener", "no_vhost", "no_route", "no_host",
    "no_endpoint", "hdr_conflict", "path_norm", "method", "limit", "rbac",
)
REASON = {name: i for i, name in enumerate(REASONS)}

DOM_EXACT, DOM_SUFFIX, DOM_PREFIX, DOM_ANY = 1, 2, 3, 4
PATH_PREFIX, PATH_EXACT, PATH_SEP_PREFIX = 1, 2, 3
ACT_FORWARD, ACT_REPLY, ACT_PUNT = 1, 2, 3
SM_EXACT, SM_PREFIX, SM_SUFFIX, SM_PRESENT = 1, 2, 3, 4
LB_ROUND_ROBIN, LB_RANDOM, LB_LEAST_REQUEST = 1, 2, 3
DF_HEAD, DF_LR = 1, 2  # l7fp_decision.flags
STR_CI = 1
HM_INVERT, HM_ABSENT, HM_MISSING_EMPTY = 1, 2, 4
LF_PUNT, LF_NORMALIZE = 1, 2
FILT_RATE_LIMIT, FILT_FAULT, FILT_RBAC = 1, 2, 3
RK_TRUE, RK_FALSE, RK_PATH, RK_METHOD, RK_HEADER, RK_SRC_CIDR = 1, 2, 3, 4, 5, 6
RB_ITEM, RB_GROUP, RB_SIDE, RB_INVERT, RB_PRIN, RB_FILTER = 1, 2, 4, 8, 16, 32
MAX_RBAC_FILTERS = 2
MAX_FILTERS = 4
DF_HEAD = 1
# byte classes (bit numbers)
C_TCHAR, C_VALUE, C_TARGET, C_UPPER, C_SP, C_COLON, C_QMARK, C_PCT = range(8)


class Decision(ctypes.Structure):
    """struct l7fp_decision (no knob-dependent fields)."""

    _fields_ = [(n, u32) for n in (
        "verdict", "reason", "consumed", "hdr_len", "body_len", "vhost", "route", "cluster",
        "endpoint", "hdr_add", "status", "reply", "flags", "gen")]


class Listener(ctypes.Structure):
    _fields_ = [(n, u32) for n in ("flags", "dom_base", "n_dom", "bucket", "nomatch", "order",
                                   "fault_status", "fault_per_million", "fault_reply",
                                   "rbac_base", "rbac_n", "rbac_deny", "rbac_reply", "rbac_nf",
                                   "trace")]


class Vhost(ctypes.Structure):
    _fields_ = [("route_base", u32), ("n_routes", u32)]


class Weighted(ctypes.Structure):
    _fields_ = [("cluster", u32), ("cum_weight", u32)]


class Cluster(ctypes.Structure):
    _fields_ = [("lb", u32), ("n_endpoints", u32)]


class HnameKey(ctypes.Structure):
    _fields_ = [("len", u32), ("pad", u32), ("w0", u64), ("w1", u64), ("w2", u64)]


class Bucket(ctypes.Structure):
    _fields_ = [("max_tokens", u64), ("tokens_per_fill", u64), ("fill_interval_ns", u64),
                ("status", u32), ("reply", u32), ("enforce_per_million", u32), ("pad", u32),
                ("tokens", u64), ("last_ns", u64)]


class CClass(ctypes.Structure):
    _fields_ = [("c", u8 * 256)]


class TdIn(ctypes.Structure):
    """struct td_in of bpf_src/test_decide.c (the test harness's inputs)."""

    _fields_ = [("rand", u32), ("rand2", u32), ("gen", u32), ("listener", u32),
                ("now_ns", u64), ("src_ip4", u32), ("pad", u32), ("rand3", u32), ("pad2", u32)]


@dataclass(frozen=True)
class Structs:
    """The knob-dependent struct classes of one knob set."""

    Str: Any
    Domain: Any
    Route: Any
    Hmatch: Any
    Blob: Any
    RbacRow: Any
    Req: Any
    ReqCtx: Any
    Qmatch: Any = None  # struct l7fp_qmatch (l7fp_query.h)


def knobs_with(overrides: dict[str, int] | None = None) -> dict[str, int]:
    k = dict(DEFAULT_KNOBS)
    k.update(overrides or {})
    return k


@lru_cache(maxsize=32)
def _structs(items: tuple[tuple[str, int], ...]) -> Structs:
    k = dict(items)
    ms = k["L7FP_MAX_STR"]

    class Str(ctypes.Structure):
        _fields_ = [("len", u32), ("flags", u32), ("ci", u64), ("m", u64 * (ms // 8)),
                    ("b", u8 * ms)]

    class Domain(ctypes.Structure):
        _fields_ = [("kind", u32), ("vhost", u32), ("s", Str)]

    class Route(ctypes.Structure):
        _fields_ = [("route_id", u32), ("path_kind", u32), ("n_hm", u32), ("hm_base", u32),
                    ("method", u64), ("method_len", u32), ("action", u32), ("cluster", u32),
                    ("n_wc", u32), ("total_weight", u32), ("status", u32), ("reply", u32),
                    ("hdr_add", u32), ("bucket", u32), ("fault_status", u32),
                    ("fault_per_million", u32), ("fault_reply", u32), ("path", Str)]

    class Hmatch(ctypes.Structure):
        _fields_ = [("slot", u32), ("kind", u32), ("flags", u32), ("pad", u32), ("v", Str)]

    class RbacRow(ctypes.Structure):
        _fields_ = [("kind", u32), ("ends", u32), ("method", u64), ("method_len", u32),
                    ("pad", u32), ("m", Hmatch)]

    class Blob(ctypes.Structure):
        _fields_ = [("len", u32), ("n_absent", u32), ("absent", u32 * k["L7FP_MAX_ABSENT"]),
                    ("b", u8 * k["L7FP_MAX_BLOB"])]

    nl, nslots = k["L7FP_MAX_LINES"], k["L7FP_MAX_SLOTS"]

    req_fields: Any = [(n, u32) for n in (
            "len", "data_len", "hdr_len", "nlines", "bad", "cur_start", "cur_colon", "sp1",
            "sp2", "q", "tflags", "method_len")] + [("method", u64)] + [(n, u32) for n in (
                "path_off", "path_len", "host_off", "host_len", "cl", "seen", "rb_item",
                "rb_group", "rb_side", "rb_perm", "rb_hit", "rb_bad", "rb_deny", "rb_hits")] + [
            ("slot_off", u32 * nslots), ("slot_len", u32 * nslots), ("ls", u16 * nl),
            ("le", u16 * nl), ("lc", u16 * nl)]

    class Req(ctypes.Structure):
        _fields_ = req_fields

    class ReqCtx(ctypes.Structure):
        _fields_ = [("rand", u32), ("rand2", u32), ("gen", u32), ("src_ip4", u32), ("now_ns", u64),
                    ("rand3", u32), ("_pad", u32), ("r", Req), ("buf", u8 * (2 * k["L7FP_MAX_HDR"] + ms + 16))]

    class Qmatch(ctypes.Structure):
        _fields_ = [("kind", u32), ("nlen", u32), ("nw", u64 * 2), ("nm", u64 * 2),
                    ("v", Str)]

    return Structs(Str, Domain, Route, Hmatch, Blob, RbacRow, Req, ReqCtx, Qmatch)


def structs(knobs: dict[str, int] | None = None) -> Structs:
    """Struct classes for `knobs` (missing knobs take the C defaults)."""
    return _structs(tuple(sorted(knobs_with(knobs).items())))
