"""Both plan generations live in the maps at once: a request decided with gen 0
sees only plan A's tables, with gen 1 only plan B's (the agent writes the
inactive generation, then flips)."""

from __future__ import annotations

import pytest

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import C1, C2, fwd, route

pytestmark = [pytest.mark.kernel]

FLOOR = {"L7FP_MAX_STR": 32, "L7FP_F_WILDCARD": 1}


def _plan(target: str, deny: str) -> P.KernelPlan:
    vh = P.VirtualHost("web", ("web",), routes=(
        route("deny", P.PathKind.EXACT, deny, P.DirectResponse(403, "no")),
        route("all", P.PathKind.PREFIX, "/", fwd(target)),
    ))
    lp = P.ListenerPlan("out", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    return P.KernelPlan("node", target, listeners=(lp,), clusters=(C1, C2))


def test_two_generations_side_by_side(decide_prog: object) -> None:
    a, b = synthesize(_plan("c1", "/a"), floor=FLOOR), synthesize(_plan("c2", "/b"), floor=FLOOR)
    assert a.cflags == b.cflags
    prog = DecideProgram.get(a.cflags)
    for name in [n for n in a.tables(0)]:
        prog.bpf[name.encode()].clear()
    for sp, gen in ((a, 0), (b, 1)):  # write both without clearing in between
        for name, entries in sp.tables(gen).items():
            t = prog.bpf[name.encode()]
            for k, v in entries.items():
                t[t.Key.from_buffer_copy(k)] = t.Leaf.from_buffer_copy(v)
    get_a = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
    get_b = b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n"
    d0, d1 = prog.run(get_a, gen=0), prog.run(get_a, gen=1)
    assert (d0.verdict, d0.status, d0.gen) == (bs.REPLY, 403, 0)
    assert (d1.verdict, d1.cluster, d1.gen) == (bs.FORWARD, b.cluster_ids["c2"], 1)
    d0, d1 = prog.run(get_b, gen=0), prog.run(get_b, gen=1)
    assert (d0.verdict, d0.cluster) == (bs.FORWARD, a.cluster_ids["c1"])
    assert (d1.verdict, d1.status) == (bs.REPLY, 403)


def test_rbac_source_cidr_needs_the_source(decide_prog: object) -> None:
    """A source-CIDR rule is decided with the client's address, and handed to
    Envoy when the caller did not give one (never allowed by default)."""
    pol = P.RbacPolicy("p", permissions=((P.Permission(any=True),),),
                       principals=((P.Principal(source_cidr="198.18.0.0/24"),),))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(
        P.VirtualHost("v", ("*",), routes=(route("r", P.PathKind.PREFIX, "/", fwd("c1")),)),),
        rbac=P.Rbac("DENY", (pol,)))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1,)), floor=FLOOR)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    get = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"
    d = prog.run(get, src="198.18.0.7")
    assert (d.verdict, d.status) == (bs.REPLY, 403)
    assert prog.run(get, src="198.19.0.7").verdict == bs.FORWARD
    d = prog.run(get)
    assert (d.verdict, bs.REASONS[d.reason]) == (bs.PASS, "rbac")
