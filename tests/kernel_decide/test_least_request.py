"""LEAST_REQUEST in l7fp_decide against the reference model: two draws
(rand2, rand3), the endpoint with fewer requests in flight (l7fp_lr_n less
l7fp_lr_gone, the counts the data path and the agent keep), a tie to the first
draw; fastpath.reference.least_request_pick given the same draws and counts."""

from __future__ import annotations

import random

import pytest

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath.reference import Request, State, least_request_pick
from fastpath.reference import decide as ref_decide
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import fwd, route

pytestmark = [pytest.mark.kernel]

EPS = 3
LR = P.Cluster("lr", P.LbPolicy.LEAST_REQUEST,
               tuple(P.Endpoint(f"198.18.0.{10 + i}", 80) for i in range(EPS)))
ONE = P.Cluster("one", P.LbPolicy.LEAST_REQUEST, (P.Endpoint("198.18.0.20", 80),))
GET = b"GET /lr HTTP/1.1\r\nHost: web\r\n\r\n"


def _plan(*clusters: P.Cluster) -> P.KernelPlan:
    vh = P.VirtualHost("web", ("web",), routes=tuple(
        route(c.name, P.PathKind.PREFIX, f"/{c.name}", fwd(c.name)) for c in clusters))
    lp = P.ListenerPlan("out", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    return P.KernelPlan("node", "1", listeners=(lp,), clusters=clusters)


class Draws(random.Random):
    """The kernel's draws for the reference: randrange(n) gives rand2 % n, then rand3 % n."""

    def __init__(self, *draws: int) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def randrange(self, n: int) -> int:  # type: ignore[override]
        return self.draws.pop(0) % n


def _set_counts(prog: DecideProgram, sp: object, gen: int, n: list[int], gone: list[int]) -> None:
    knobs = bs.knobs_with(sp.knobs)  # type: ignore[attr-defined]
    cid = sp.cluster_ids["lr"]  # type: ignore[attr-defined]
    per_gen = knobs["L7FP_N_CLUSTERS"] * knobs["L7FP_LR_EPS"]
    for name, vals in (("l7fp_lr_n", n), ("l7fp_lr_gone", gone)):
        t = prog.bpf[name.encode()]
        for e, v in enumerate(vals):
            t[t.Key(gen * per_gen + cid * knobs["L7FP_LR_EPS"] + e)] = t.Leaf(v % 2**64)


def test_pick_is_the_models(decide_prog: object) -> None:
    sp = synthesize(_plan(LR, ONE))
    assert sp.knobs["L7FP_F_LEAST_REQUEST"] == 1
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    rng = random.Random(7)
    seen = set()
    for _ in range(150):
        # in flight = n - gone: the agent's ends are taken off the kernel's count
        flying = [rng.choice((0, 0, 1, 2, 5)) for _ in range(EPS)]
        gone = [rng.randrange(4) for _ in range(EPS)]
        _set_counts(prog, sp, 0, [f + g for f, g in zip(flying, gone, strict=True)], gone)
        r2, r3 = rng.getrandbits(32), rng.getrandbits(32)
        d = prog.run(GET, rand2=r2, rand3=r3)
        want = least_request_pick(EPS, Draws(r2, r3), flying.__getitem__)
        assert (d.verdict, d.endpoint) == (bs.FORWARD, want), (flying, r2 % EPS, r3 % EPS)
        assert d.flags & bs.DF_LR
        # the model's whole decision, given the same counts, picks the same endpoint
        state = State(in_flight={("lr", i): f for i, f in enumerate(flying)})
        ref = ref_decide(_plan(LR, ONE), "out", Request("GET", "/lr", "web"), Draws(r2, r3), state)
        assert ref.endpoint == LR.endpoints[want], ref
        seen.add((flying[r2 % EPS] == flying[r3 % EPS], want == r3 % EPS != r2 % EPS))
    # ties kept the first draw and the second draw won when it had fewer in flight
    assert {(True, False), (False, True)} <= seen, seen


def test_generation_and_single_endpoint(decide_prog: object) -> None:
    """The counts are read in the decision's generation; a cluster of one
    endpoint is no pick (not counted: no L7FP_DF_LR)."""
    sp = synthesize(_plan(LR, ONE))
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp, gen=1)
    _set_counts(prog, sp, 0, [0, 0, 0], [0, 0, 0])
    _set_counts(prog, sp, 1, [9, 0, 0], [0, 0, 0])
    d = prog.run(GET, gen=1, rand2=0, rand3=1)  # endpoint 0 busy in generation 1
    assert (d.verdict, d.endpoint, d.gen) == (bs.FORWARD, 1, 1)
    d = prog.run(b"GET /one HTTP/1.1\r\nHost: web\r\n\r\n", gen=1, rand2=5, rand3=6)
    assert (d.verdict, d.endpoint, d.flags & bs.DF_LR) == (bs.FORWARD, 0, 0)


def test_not_compiled_without_a_choice() -> None:
    """Only a plan with a LEAST_REQUEST cluster of two or more endpoints
    compiles the counts in (-DL7FP_F_LEAST_REQUEST=1)."""
    assert synthesize(_plan(ONE)).knobs["L7FP_F_LEAST_REQUEST"] == 0
    rr = P.Cluster("lr", P.LbPolicy.ROUND_ROBIN, LR.endpoints)
    assert synthesize(_plan(rr)).knobs["L7FP_F_LEAST_REQUEST"] == 0
