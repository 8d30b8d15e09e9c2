"""Guard punt entries in the kernel: l7fp_decide hands exactly the requests the
classifier's guards name (CORS: Origin present; CSRF: mutating methods) to
Envoy and decides the rest as the reference model does.

The plan is the one tests/split/test_guards.py runs in a real Envoy (there the
model's kernel answers are checked against Envoy's)."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import envoy_model as em
from fastpath import reference
from fastpath.classify import Resources
from fastpath.split import plan_of
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.harness import CLUSTERS
from tests.split.test_guards import REQUESTS, bootstrap

pytestmark = [pytest.mark.kernel]


def raw(req: reference.Request) -> bytes:
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {req.host}"]
    lines += [f"{n}: {v}" for n, v in req.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_guards_in_the_kernel_equal_the_reference() -> None:
    from support.env import require_kernel

    require_kernel()
    boot = bootstrap(18080, 18081, {c: 19000 + i for i, c in enumerate(CLUSTERS)})
    listeners = [em.to_json(em.parse(em.LISTENER, x)) for x in boot["staticResources"]["listeners"]]
    clusters = [em.to_json(em.parse(em.CLUSTER, x)) for x in boot["staticResources"]["clusters"]]
    plan = plan_of("guards", Resources(listeners, {}, clusters, {}))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    lid = sp.listener_ids["g"]
    seen = {"forward": 0, "envoy": 0}
    for req in REQUESTS:
        ref = reference.decide(plan, "g", req, random.Random(1))
        d = prog.run(raw(req), listener=lid)
        where = (req, ref.kind, ref.cluster, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        if ref.kind == "envoy":
            assert d.verdict == bs.PASS, where
        else:
            assert ref.kind == "forward" and d.verdict == bs.FORWARD, where
            assert d.cluster == sp.cluster_ids[ref.cluster], where
        seen[ref.kind] += 1
    assert seen["forward"] >= 20 and seen["envoy"] >= 20, seen
