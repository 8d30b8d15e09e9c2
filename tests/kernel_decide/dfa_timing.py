"""Run time of the DFA walk (BPF_PROG_TEST_RUN), not a test: root, BCC.

    sudo PYTHONPATH=.:tests .venv/bin/python tests/kernel_decide/dfa_timing.py

One program (the floored knobs of test_dfa.py); per plan the median of 5
timings of 20000 runs each, as the kernel measures them. Figures in
docs/kernel-decision.md.
"""

from __future__ import annotations

from fastpath import plan as P
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import C1, C2
from kernel_decide.test_dfa import DFA_FLOOR, _hm, _regex_match
from kernel_decide.test_differential import raw


def plan(route: P.Route) -> P.KernelPlan:
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(P.VirtualHost("v", ("*",), (route,)),))
    return P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2))


fwd = P.ClusterAction((P.WeightedCluster("c1", 1),))
ua = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15"
cases = {
  "prefix /users/": (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/users/"), fwd, P.Verdict.KERNEL), []),
  "regex /users/[0-9]+": (P.Route("r", _regex_match("/users/[0-9]+", ()), fwd, P.Verdict.KERNEL), []),
  "prefix + UA suffix": (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/users/", headers=(_hm("user-agent", P.StringKind.SUFFIX, "605.1.15", False, False, False),)), fwd, P.Verdict.KERNEL), [("User-Agent", ua)]),
  "prefix + UA contains safari (ic)": (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/users/", headers=(_hm("user-agent", P.StringKind.CONTAINS, "safari", True, False, False),)), fwd, P.Verdict.KERNEL), [("User-Agent", ua)]),
}


def main() -> None:
    prog = DecideProgram.get(synthesize(P.KernelPlan("n", "0"), floor=DFA_FLOOR).cflags)
    for name, (r, hdrs) in cases.items():
        sp = synthesize(plan(r), floor=DFA_FLOOR)
        assert sp.cflags == prog.cflags and not sp.notes
        prog.load(sp)
        data = raw("GET", "/users/12345678", "h", hdrs)
        d = prog.run(data, listener=sp.listener_ids["l"])
        ts = sorted(prog.time_ns(data) for _ in range(5))
        print(f"{name}: verdict {d.verdict}, {len(data)} bytes head, {ts[2]} ns "
              "(median of 5 x 20000 runs)")


if __name__ == "__main__":
    main()
