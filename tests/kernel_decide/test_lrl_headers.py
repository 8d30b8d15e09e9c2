"""The kernel's rate-limited reply carries response_headers_to_add.

Same plan and request sequence as tests/split/test_lrl_headers.py (there the
reference model's replies, as fastpath.synth.reply_bytes writes them, are
checked against the real Envoy's 429s): l7fp_decide must decide each request
as the model does and answer the limited ones with exactly those bytes."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import reference
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.test_lrl_headers import REQUESTS, bootstrap, kernel_reply, plan_from

pytestmark = [pytest.mark.kernel]


def test_rate_limited_reply_bytes_in_the_kernel() -> None:
    from support.env import require_kernel

    require_kernel()
    plan = plan_from(bootstrap(18080, 18081, 19000))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    blob = bs.structs(sp.knobs).Blob
    state, rng = reference.State(now_ms=1.0), random.Random(0)
    replies = 0
    for method, path in REQUESTS:
        ref = reference.decide(plan, "l", reference.Request(method, path, "svc"), rng, state)
        d = prog.run(f"{method} {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode(),
                     listener=sp.listener_ids["l"], now_ns=1_000_000)
        where = (method, path, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        if ref.kind == "forward":
            assert d.verdict == bs.FORWARD, where
            continue
        assert ref.kind == "reply" and d.verdict == bs.REPLY and d.status == 429, where
        b = blob.from_buffer_copy(sp.rows["l7fp_replies"][d.reply])
        assert bytes(b.b[:b.len]) == kernel_reply(ref, method), where
        assert b"x-" in bytes(b.b[:b.len]), where
        replies += 1
    assert replies == 5
