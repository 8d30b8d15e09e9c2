"""Differential of the DFA matchers (bpf_src/include/l7fp_dfa.h): path regex
routes and header contains / safe_regex matchers, l7fp_decide in the kernel
(BPF_PROG_TEST_RUN) against the reference model, request by request, for
Hypothesis-generated routes. One compiled program (floored knobs)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath import reference
from fastpath.classify_match import route_match as classify_route_match
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import C1, C2
from kernel_decide.test_differential import FLOOR, FixedRng, raw

pytestmark = [pytest.mark.kernel]

DFA_FLOOR = {**FLOOR, "L7FP_F_DFA": 1, "L7FP_N_DFAS": 16, "L7FP_F_LONG_NAMES": 1}
REGEXES = ["/users/[0-9]+", "/a/[a-z]+/b", "/(ab|cd)+", ".*x.*", "/api/v[12]/.*", "/[^/]+",
           "/a.*", "/a?b*", "/users/[0-9]{2,3}/x"]
HREGEXES = [".*Safari.*", "v[0-9]+", "(v|w)*", "[a-z]+-[0-9]", ".*", "a|bb", ".+"]
NEEDLES = ["Safari", "v", "V1", "a-b", ","]


def _hm(name: str, kind: P.StringKind, v: str, ic: bool, inv: bool, tmae: bool) -> P.HeaderMatch:
    return P.HeaderMatch(name, P.StringMatch(kind, v, ic), inv, False, tmae)


hnames = st.sampled_from(["x-a", "user-agent", "baggage-user-agent"])
header_match = st.one_of(
    st.builds(_hm, hnames, st.just(P.StringKind.CONTAINS), st.sampled_from(NEEDLES),
              st.booleans(), st.booleans(), st.booleans()),
    st.builds(_hm, hnames, st.just(P.StringKind.REGEX), st.sampled_from(HREGEXES),
              st.booleans(), st.booleans(), st.booleans()),
    st.builds(_hm, hnames, st.just(P.StringKind.EXACT), st.sampled_from(["v", "v1"]),
              st.booleans(), st.booleans(), st.just(False)),
)


def _regex_match(rx: str, headers: tuple[P.HeaderMatch, ...]) -> P.RouteMatch:
    m, reasons = classify_route_match({"safeRegex": {"regex": rx}})
    assert not reasons, reasons
    return P.RouteMatch(m.path_kind, m.path, headers=headers, regex_dfa=m.regex_dfa,
                        regex_literal=m.regex_literal, regex_prefix=m.regex_prefix)


route_match = st.one_of(
    st.builds(_regex_match, st.sampled_from(REGEXES),
              st.lists(header_match, max_size=2).map(tuple)),
    st.builds(P.RouteMatch, st.just(P.PathKind.PREFIX), st.sampled_from(["/", "/a"]),
              headers=st.lists(header_match, max_size=2).map(tuple)),
)
action = st.sampled_from([P.ClusterAction((P.WeightedCluster("c1", 1),)),
                          P.ClusterAction((P.WeightedCluster("c2", 1),)),
                          P.DirectResponse(403, "no")])
route = st.builds(P.Route, st.uuids().map(lambda u: u.hex[:6]), route_match, action,
                  st.just(P.Verdict.KERNEL))


@st.composite
def plans(draw: st.DrawFn) -> P.KernelPlan:
    routes = tuple(draw(st.lists(route, min_size=1, max_size=5)))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes),))
    return P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2))


values = st.sampled_from(["", "v", "V1", "v12", "Mozilla Safari x", "safari", "a-b", "ab-1",
                          "bb", "w v", "x,y", "caf\xe9", "v" * 300])
request = st.tuples(
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/users/12", "/users/123/x", "/users/", "/users/1a", "/a/bc/b", "/abcd",
                     "/ab?x=1", "/api/v1/z", "/api/v3/", "/a", "/", "/x", "/ax?q=y",
                     "/users/99?z"]),
    st.lists(st.tuples(st.sampled_from(["x-a", "User-Agent", "x-b", "baggage-user-agent",
                                        "baggage-xxer-agent"]), values), max_size=3),
)


@pytest.fixture(scope="module")
def prog() -> DecideProgram:
    from support.env import require_kernel

    require_kernel()
    return DecideProgram.get(synthesize(P.KernelPlan("n", "0"), floor=DFA_FLOOR).cflags)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(plan=plans(), reqs=st.lists(request, min_size=1, max_size=6))
def test_dfa_kernel_equals_reference(prog: DecideProgram, plan: P.KernelPlan,
                                     reqs: list[tuple]) -> None:
    sp = synthesize(plan, floor=DFA_FLOOR)
    assert sp.cflags == prog.cflags, "a generated plan outgrew the floored knobs"
    assert not sp.notes, sp.notes
    prog.load(sp)
    for method, path, headers in reqs:
        data = raw(method, path, "h", headers)
        ref = reference.decide(plan, "l", reference.Request(
            method, path, "h", tuple((n.lower(), v) for n, v in headers)), FixedRng(0))
        d = prog.run(data.decode("latin-1").encode("latin-1") if isinstance(data, bytes) else data,
                     listener=sp.listener_ids["l"])
        where = (method, path, headers, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        if d.verdict == bs.PASS:
            # a duplicate header, a value with bytes outside ASCII (the walk's
            # alphabet) or a head over L7FP_MAX_HDR: Envoy decides
            assert ref.kind == "envoy" or bs.REASONS[d.reason] in ("hdr_conflict", "too_large"), where
            continue
        assert ref.kind in ("forward", "reply"), where
        if d.verdict == bs.FORWARD:
            assert ref.kind == "forward" and d.cluster == sp.cluster_ids[ref.cluster], where
        else:
            assert ref.kind == "reply" and d.status == ref.status, where


def test_regex_routes_decided_in_the_kernel(prog: DecideProgram) -> None:
    """Fixed cases: the kernel forwards on a regex path and a contains header,
    falls through on a non-match, and hands over what it cannot walk."""
    ua = _hm("user-agent", P.StringKind.CONTAINS, "safari", True, False, False)
    rx = _hm("x-a", P.StringKind.REGEX, "v[0-9]+", False, False, False)
    routes = (P.Route("ua", _regex_match("/users/[0-9]+", (ua,)), P.ClusterAction(
                  (P.WeightedCluster("c2", 1),)), P.Verdict.KERNEL),
              P.Route("rx", P.RouteMatch(P.PathKind.PREFIX, "/", headers=(rx,)),
                      P.DirectResponse(403, "no"), P.Verdict.KERNEL),
              P.Route("re", _regex_match("/users/[0-9]+", ()), P.ClusterAction(
                  (P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes),))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2)), floor=DFA_FLOOR)
    assert not sp.notes, sp.notes
    prog.load(sp)

    def run(path: str, *hdrs: tuple[str, str]) -> tuple[str, int]:
        d = prog.run(raw("GET", path, "h", list(hdrs)), listener=sp.listener_ids["l"])
        return bs.VERDICT_NAMES[d.verdict].lower(), d.cluster if d.verdict == bs.FORWARD else d.status

    c1, c2 = sp.cluster_ids["c1"], sp.cluster_ids["c2"]
    assert run("/users/42", ("User-Agent", "Mozilla SAFARI/1")) == ("forward", c2)
    assert run("/users/42?x=1", ("User-Agent", "curl")) == ("forward", c1)
    assert run("/users/42/x") == ("reply", 404)
    assert run("/users/42x", ("x-a", "v12")) == ("reply", 403)
    assert run("/users/4", ("x-a", "v12x")) == ("forward", c1)
    assert run("/users/4", ("User-Agent", "caf\xe9 Safari"))[0] == "pass"  # outside ASCII
    assert run("/users/4", ("x-a", "v1"), ("x-a", "v2"))[0] == "pass"  # Envoy joins them


path_sm = st.one_of(
    st.builds(P.StringMatch, st.just(P.StringKind.REGEX), st.sampled_from(REGEXES)),
    st.builds(P.StringMatch, st.just(P.StringKind.CONTAINS), st.sampled_from(["/a", "b", "users/1"]),
              st.booleans()),
)
permission = st.one_of(
    st.builds(P.Permission, path=path_sm, invert=st.booleans()),
    st.builds(P.Permission, headers=st.lists(header_match, min_size=1, max_size=1).map(tuple),
              invert=st.booleans()),
)
rbac = st.builds(P.Rbac, st.sampled_from(["ALLOW", "DENY"]), st.lists(st.builds(
    P.RbacPolicy, st.uuids().map(lambda u: u.hex[:6]),
    st.lists(st.lists(permission, min_size=1, max_size=2).map(tuple), min_size=1, max_size=2).map(tuple),
    st.just(((P.Principal(any=True),),))), min_size=1, max_size=2).map(tuple))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(rb=rbac, reqs=st.lists(request, min_size=1, max_size=6))
def test_dfa_rbac_kernel_equals_reference(prog: DecideProgram, rb: P.Rbac, reqs: list[tuple]) -> None:
    """RBAC url_path and header atoms with contains / safe_regex, in the kernel."""
    routes = (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/"),
                      P.ClusterAction((P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL),)
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes),), rbac=rb, rbacs=(rb,))
    plan = P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2))
    sp = synthesize(plan, floor=DFA_FLOOR)
    assert sp.cflags == prog.cflags and not sp.notes, sp.notes
    prog.load(sp)
    for method, path, headers in reqs:
        ref = reference.decide(plan, "l", reference.Request(
            method, path, "h", tuple((n.lower(), v) for n, v in headers)), FixedRng(0))
        d = prog.run(raw(method, path, "h", headers), listener=sp.listener_ids["l"])
        where = (method, path, headers, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        if d.verdict == bs.PASS:
            assert ref.kind == "envoy" or bs.REASONS[d.reason] in ("rbac", "too_large"), where
            continue
        assert (ref.kind, ref.status if ref.kind == "reply" else 0) == (
            "forward" if d.verdict == bs.FORWARD else "reply",
            d.status if d.verdict == bs.REPLY else 0), where


def test_rbac_path_regex_denies_in_the_kernel(prog: DecideProgram) -> None:
    deny = P.Rbac("DENY", (P.RbacPolicy("p", ((P.Permission(path=P.StringMatch(
        P.StringKind.REGEX, "/users/[0-9]+")),),), ((P.Principal(any=True),),)),))
    routes = (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/"),
                      P.ClusterAction((P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL),)
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes),), rbac=deny, rbacs=(deny,))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2)), floor=DFA_FLOOR)
    assert not sp.notes, sp.notes
    prog.load(sp)
    lid = sp.listener_ids["l"]
    assert (prog.run(raw("GET", "/users/12?x=1", "h", []), listener=lid).status) == 403
    assert prog.run(raw("GET", "/users/1a", "h", []), listener=lid).verdict == bs.FORWARD


def test_safari_route_of_istio_tutorial(prog: DecideProgram) -> None:
    """istio-tutorial's `baggage-user-agent` regex `.*Safari.*` (18-byte name:
    keyed exactly, a name differing only in its middle bytes is another header)."""
    from fastpath.classify_match import header_match

    hm, reasons = header_match({"name": "baggage-user-agent", "safeRegexMatch": {"regex": ".*Safari.*"}})
    assert not reasons and hm.match is not None and hm.match.kind is P.StringKind.CONTAINS
    routes = (P.Route("v2", P.RouteMatch(P.PathKind.PREFIX, "/", headers=(hm,)), P.ClusterAction(
                  (P.WeightedCluster("c2", 1),)), P.Verdict.KERNEL),
              P.Route("v1", P.RouteMatch(P.PathKind.PREFIX, "/"), P.ClusterAction(
                  (P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes),))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2)), floor=DFA_FLOOR)
    assert not sp.notes, sp.notes
    prog.load(sp)
    lid, c1, c2 = sp.listener_ids["l"], sp.cluster_ids["c1"], sp.cluster_ids["c2"]
    for name, value, want in (("Baggage-User-Agent", "Mozilla Safari/605", c2),
                              ("baggage-user-agent", "safari", c1),  # case-sensitive
                              ("baggage-xxer-agent", "Mozilla Safari/605", c1)):
        d = prog.run(raw("GET", "/", "h", [(name, value)]), listener=lid)
        assert (d.verdict, d.cluster) == (bs.FORWARD, want), (name, value)
