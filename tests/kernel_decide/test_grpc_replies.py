"""l7fp_decide hands a gRPC request (content-type application/grpc or
application/grpc+...) to Envoy, whose local replies to it are gRPC ones
(tests/split/test_grpc_replies.py), and decides the other content types as
the reference model does."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import reference
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.test_grpc_replies import GRPC_TYPES, OTHER_TYPES, bootstrap, plan_from, requests
from tests.split.test_rbac_matcher import raw_request

pytestmark = [pytest.mark.kernel]


def test_grpc_requests_pass_in_the_kernel() -> None:
    from support.env import require_kernel

    require_kernel()
    plan = plan_from(bootstrap(18080, 18081))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    cases = [*GRPC_TYPES, *OTHER_TYPES, " application/grpc ", "application/grpc+"]
    for ct in cases:
        state = reference.State(now_ms=1.0)
        for req in requests(ct):
            low = reference.Request(req.method, req.path, req.host,
                                    tuple((n, v.strip()) for n, v in req.headers))
            ref = reference.decide(plan, "g", low, random.Random(0), state)
            d = prog.run(raw_request(req), listener=sp.listener_ids["g"], now_ns=1_000_000)
            where = (req, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
            if ref.kind == "envoy":
                assert ct not in OTHER_TYPES and d.verdict == bs.PASS, where
                assert bs.REASONS[d.reason] == "unparsed", where
            else:
                assert d.verdict == bs.REPLY and d.status == ref.status, where
        prog.load(sp)  # fresh buckets for the next content type
