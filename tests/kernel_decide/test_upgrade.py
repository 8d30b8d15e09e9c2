"""Upgrade requests in the kernel: l7fp_decide hands every request with an
Upgrade header (and CONNECT) to Envoy, so a route's upgrade_configs need no
guard entry; the other requests of the websocket route are decided as the
reference model decides them (tests/split/test_upgrade.py: as Envoy does)."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import reference
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.split.test_upgrade import REQUESTS, bootstrap, plan_from

pytestmark = [pytest.mark.kernel]


def raw(req: reference.Request) -> bytes:
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {req.host}"]
    lines += [f"{n}: {v}" for n, v in req.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_upgrade_requests_go_to_envoy_in_the_kernel() -> None:
    from support.env import require_kernel

    require_kernel()
    plan = plan_from(bootstrap(18080, 18081, 19000))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    lid = sp.listener_ids["ws"]
    kinds = {"forward": 0, "reply": 0, "envoy": 0}
    extra = [reference.Request("GET", "/ws", "svc", (("UPGRADE", "websocket"),)),
             reference.Request("CONNECT", "/ws", "svc")]
    for req in [*REQUESTS, *extra]:
        low = reference.Request(req.method, req.path, req.host,
                                tuple((n.lower(), v) for n, v in req.headers))
        ref = reference.decide(plan, "ws", low, random.Random(1))
        d = prog.run(raw(req), listener=lid)
        where = (req, ref.kind, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        kinds[ref.kind] += 1
        if req.method == "CONNECT" or any(n.lower() == "upgrade" for n, _ in req.headers):
            assert ref.kind == "envoy" and d.verdict == bs.PASS, where
            assert bs.REASONS[d.reason] == "upgrade", where
        elif ref.kind == "forward":
            assert d.verdict == bs.FORWARD and d.cluster == sp.cluster_ids[ref.cluster], where
        else:
            assert ref.kind == "reply" and d.verdict == bs.REPLY and d.status == ref.status, where
    assert kinds == {"forward": 12, "reply": 4, "envoy": 26}, kinds
