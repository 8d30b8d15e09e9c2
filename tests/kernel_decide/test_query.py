"""Query-parameter matchers in the kernel: the plan of
tests/split/test_query_envoy.py (there checked against the real Envoy) decided
by l7fp_decide (l7fp_query.h), query string by query string, as the reference
model decides: the same route, or PASS where the model says Envoy."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import reference
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.test_query_envoy import MATCHERS, QUERIES, bootstrap, plan_from

pytestmark = [pytest.mark.kernel]


def raw(path: str, host: str = "h") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def test_query_matchers_in_the_kernel_equal_the_reference() -> None:
    from support.env import require_kernel

    require_kernel()
    plan = plan_from(bootstrap(list(range(18300, 18300 + len(MATCHERS))), 18299), executable=True)
    sp = synthesize(plan)
    assert not any("query" in n for n in sp.notes), sp.notes
    assert sp.knobs["L7FP_F_QUERY"] == 1
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    blob = bs.structs(sp.knobs).Blob
    seen = {"hit": 0, "miss": 0, "envoy": 0}
    for i in range(len(MATCHERS)):
        for q in QUERIES:
            ref = reference.decide(plan, f"q{i}", reference.Request("GET", "/p" + q, "h", ()),
                                   random.Random(0))
            d = prog.run(raw("/p" + q), listener=sp.listener_ids[f"q{i}"])
            where = (MATCHERS[i], q, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
            if ref.kind == "envoy":
                assert d.verdict == bs.PASS, where
                seen["envoy"] += 1
                continue
            assert ref.kind == "reply" and d.verdict == bs.REPLY, where
            b = blob.from_buffer_copy(sp.rows["l7fp_replies"][d.reply])
            assert bytes(b.b[:b.len]).split(b"\r\n\r\n", 1)[1] == ref.body.encode(), where
            seen[ref.body] += 1
    print(seen)
    assert seen["hit"] >= 40 and seen["miss"] >= 100 and seen["envoy"] >= 3 * len(MATCHERS), seen


def test_no_query_matcher_compiles_none_in() -> None:
    from kernel_decide.plans import parser_plan

    assert synthesize(parser_plan()).knobs["L7FP_F_QUERY"] == 0
