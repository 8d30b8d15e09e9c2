"""RBAC matcher API in the kernel: the plan of tests/split/test_rbac_matcher.py
(there checked against the real Envoy) decided by l7fp_decide, request by
request and source address by source address, as the reference model decides."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import reference
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.test_rbac_matcher import HEADERS, MATCHERS, bootstrap, plan_from, raw_request

pytestmark = [pytest.mark.kernel]


def test_rbac_matcher_in_the_kernel_equals_the_reference() -> None:
    from support.env import require_kernel

    require_kernel()
    plan = plan_from(bootstrap(list(range(18100, 18100 + len(MATCHERS))), 18099))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    seen = {"deny": 0, "allow": 0, "envoy": 0, "handed": 0}
    for name in MATCHERS:
        for headers in HEADERS:
            for src in ("198.18.0.2", "127.0.0.2"):
                req = reference.Request("GET", "/p", "svc", headers, src_ip=src)
                ref = reference.decide(plan, name, req, random.Random(0))
                d = prog.run(raw_request(req), listener=sp.listener_ids[name], src=src)
                where = (name, headers, src, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
                if ref.kind == "envoy":
                    assert d.verdict == bs.PASS, where
                    seen["envoy"] += 1
                    continue
                if d.verdict == bs.PASS:
                    # a repeated header: Envoy matches the joined values, the
                    # kernel hands the request over (allowed: rule 2)
                    assert bs.REASONS[d.reason] == "rbac" and len({n for n, _ in headers}) < len(headers), where
                    seen["handed"] += 1
                    continue
                assert ref.kind == "reply" and d.verdict == bs.REPLY and d.status == ref.status, where
                seen["deny" if ref.status == 403 else "allow"] += 1
    print(seen)
    assert seen["deny"] >= 60 and seen["allow"] >= 60 and seen["envoy"] == 0, seen
