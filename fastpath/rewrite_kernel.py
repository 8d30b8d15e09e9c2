"""The kernel half of path rewrites: the dp_rw map of bpf_src/dp_rewrite.h.

`fastpath.synth_tables` calls `note()` for each KERNEL route whose
ClusterAction carries a PathRewrite (fastpath.rewrite) and the synthesis then
compiles with -DDP_REWRITE=1; the agent (fastpath.agent_synth.program) calls
`write()` with the node's module for the generation it fills. `DpRw` mirrors
`struct dp_rw` (checked by tests/kernel_datapath/test_rewrite_datapath.py).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from fastpath.plan import PathRewrite
from fastpath.rewrite import MAX_VALUE, ORIGINAL_PATH

WHOLE = 0xFFFF  # DP_RW_WHOLE
NAME = 32  # DP_RW_NAME
RW_MAX = 64  # DP_RW_MAX
RW_TARGET = 256  # DP_RW_TARGET
assert MAX_VALUE <= RW_MAX
# The least L7FP_MAX_HDR (a power of two) with which dp_rw_build's writes, up to
# MAX_HDR + RW_MAX + RW_TARGET + 8 into a buffer of 2 * MAX_HDR, stay past the
# head's copy (dp_rewrite.h's _Static_assert): the synthesis raises it to this.
MIN_MAX_HDR = 1 << (RW_MAX + RW_TARGET + 8 - 1).bit_length()


class DpRw(ctypes.Structure):
    _fields_ = [("on", ctypes.c_uint32), ("cut", ctypes.c_uint32), ("check_len", ctypes.c_uint32),
                ("value_len", ctypes.c_uint32), ("slot", ctypes.c_uint32),
                ("name_len", ctypes.c_uint32), ("name", ctypes.c_uint8 * NAME),
                ("check", ctypes.c_uint8 * RW_MAX), ("value", ctypes.c_uint8 * (RW_MAX + 8))]


def entry(rw: PathRewrite, slot: int) -> bytes:
    """The dp_rw value of a route with `rw`; `slot` is the l7fp header slot of
    x-envoy-original-path (the kernel's must-be-absent check)."""
    e = DpRw(on=1, cut=WHOLE if rw.cut is None else rw.cut, check_len=len(rw.check),
             value_len=len(rw.value), slot=slot)
    name = f"{ORIGINAL_PATH}: ".encode()
    e.name_len = len(name)
    ctypes.memmove(e.name, name, len(name))
    ctypes.memmove(e.check, rw.check.encode(), len(rw.check))
    ctypes.memmove(e.value, rw.value.encode(), len(rw.value))
    return bytes(e)


def rows(rewrites: dict[int, bytes], n_routes: int, gen: int) -> dict[bytes, bytes]:
    """Every entry of generation `gen` (route id -> value, zeros for routes
    without a rewrite, so nothing of an older plan stays)."""
    empty = bytes(ctypes.sizeof(DpRw))
    return {struct.pack("<I", (gen & 1) * n_routes + rid): rewrites.get(rid, empty)
            for rid in range(n_routes)}


def write(bpf: Any, sp: Any, gen: int) -> None:
    """sp.rewrites into the module's dp_rw for generation `gen` (nothing
    when the plan has none: the module then has no dp_rw)."""
    rewrites = getattr(sp, "rewrites", None)
    if not rewrites:
        return
    t = bpf["dp_rw"]
    for k, v in rows(rewrites, sp.knobs["L7FP_N_ROUTES"], gen).items():
        t[t.Key.from_buffer_copy(k)] = t.Leaf.from_buffer_copy(v)
