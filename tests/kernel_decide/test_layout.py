"""The ctypes mirrors (fastpath.bpf_structs) match the C layout clang gives the
structs of bpf_src/include/l7fp_defs.h, read back through BCC's map types."""

from __future__ import annotations

import ctypes

import pytest

from fastpath import bpf_structs as bs
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import parser_plan

pytestmark = [pytest.mark.kernel]


def _layout(cls: type) -> tuple[int, list[tuple[str, int, int]]]:
    fields = [(name, getattr(cls, name).offset, getattr(cls, name).size)
              for name, *_ in cls._fields_ if not name.startswith("__pad")]
    return ctypes.sizeof(cls), fields


def test_mirrors_match_c(decide_prog: object) -> None:
    sp = synthesize(parser_plan())
    prog = DecideProgram.get(sp.cflags)
    st = bs.structs(sp.knobs)
    leaf = {
        "l7fp_listeners": bs.Listener, "l7fp_domains": st.Domain, "l7fp_vhosts": bs.Vhost,
        "l7fp_routes": st.Route, "l7fp_hmatch": st.Hmatch, "l7fp_weighted": bs.Weighted,
        "l7fp_clusters": bs.Cluster, "l7fp_replies": st.Blob, "l7fp_hdradds": st.Blob,
        "l7fp_buckets": bs.Bucket, "l7fp_rbac": st.RbacRow, "l7fp_cclass": bs.CClass, "l7fp_scratch": st.ReqCtx,
        "td_out": bs.Decision, "td_in": bs.TdIn, "l7fp_qmatch": st.Qmatch,
    }
    for name, mine in leaf.items():
        c = prog.bpf[name.encode()].Leaf
        c = getattr(c, "_type_", c)  # per-CPU maps: an array of the struct, one per CPU
        assert ctypes.sizeof(c) == ctypes.sizeof(mine), name
        assert _layout(c) == _layout(mine), name
    key = prog.bpf[b"l7fp_hnames"].Key
    assert _layout(key) == _layout(bs.HnameKey)
    assert ctypes.sizeof(st.Str) == ctypes.sizeof(prog.bpf[b"l7fp_domains"].Leaf) - 8


@pytest.mark.slow
def test_defaults_compile_with_every_feature(decide_prog: object) -> None:
    """No -D flag at all: every #ifndef default, every feature compiled in, the
    largest default loop bounds -- the verifier still accepts it."""
    prog = DecideProgram.get(())
    d = prog.run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert d.verdict == bs.PASS  # empty tables: nothing matches, Envoy decides


@pytest.mark.slow
def test_largest_program_the_caps_allow(decide_prog: object) -> None:
    """The synthesis never asks for more than its caps; the program at the caps,
    with every feature, passes the verifier."""
    from fastpath import synth
    from fastpath.synth_tables import MAX_QMATCH

    caps = dict(bs.DEFAULT_KNOBS, L7FP_MAX_DOMAINS=synth.MAX_DOMAINS_CAP,
                L7FP_MAX_ROUTES=synth.MAX_ROUTES_CAP, L7FP_MAX_STR=synth.MAX_STR_CAP,
                L7FP_MAX_RBAC=synth.MAX_RBAC_CAP, L7FP_MAX_HMATCH=synth.MAX_HMATCH_CAP,
                L7FP_MAX_WEIGHTED=synth.MAX_WEIGHTED_CAP, L7FP_N_DOMAINS=128,
                L7FP_F_QUERY=1, L7FP_MAX_QMATCH=MAX_QMATCH, L7FP_F_DFA=1, L7FP_F_LONG_NAMES=1,
                L7FP_F_LEAST_REQUEST=1)
    prog = DecideProgram.get(tuple(f"-D{k}={v}" for k, v in sorted(caps.items())))
    assert prog.run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").verdict == bs.PASS
