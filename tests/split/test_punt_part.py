"""Punt entries keep the part of the matcher the kernel evaluates
(fastpath.synth_punt): which conjuncts stay, what the synthesized row holds,
the verdicts of the routes after it (executable_plan), and the reference
model stopping where the kernel does. Pure (no Envoy, no kernel)."""

from __future__ import annotations

import dataclasses

from fastpath import bpf_structs as bs
from fastpath.classify_match import route_match
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Endpoint,
    HeaderMatch,
    KernelPlan,
    LbPolicy,
    LocalRateLimit,
    PathKind,
    QueryParamMatch,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, decide
from fastpath.synth import executable_plan, synthesize
from fastpath.synth_tables import punt_catches_all, punt_match
from tests.split import harness

AUTH = HeaderMatch(":authority", StringMatch(StringKind.EXACT, "api.test"))
FWD = ClusterAction((WeightedCluster("c", 1),))
C = Cluster("c", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.2", 80),))


def listener_plan(routes: tuple[Route, ...]) -> KernelPlan:
    return harness.listener_plan(routes, (C,))


def _r(name: str, m: RouteMatch, verdict: Verdict = Verdict.KERNEL, **kw: object) -> Route:
    return Route(name, m, FWD, verdict, **kw)  # type: ignore[arg-type]


def _verdicts(plan: KernelPlan) -> list[tuple[str, Verdict, str]]:
    return [(r.name, r.verdict, r.reason) for r in
            executable_plan(plan).listeners[0].virtual_hosts[0].routes]


def test_an_authority_matcher_is_left_out_and_the_path_kept() -> None:
    """The task's example: /api + :authority, then /static."""
    m, reasons = route_match({"prefix": "/api", "headers": [
        {"name": ":authority", "stringMatch": {"exact": "api.test"}}]})
    assert reasons == []  # the classifier can say it; the synthesis cannot build it
    assert punt_match(m) == RouteMatch(PathKind.PREFIX, "/api")
    plan = listener_plan((_r("api", m), _r("static", RouteMatch(PathKind.PREFIX, "/static"))))
    assert _verdicts(plan) == [
        ("api", Verdict.ENVOY, "kernel decision: header name ':authority' not matched in the kernel"),
        ("static", Verdict.KERNEL, "")]
    sp = synthesize(plan)
    st = bs.structs(sp.knobs)
    rows = [st.Route.from_buffer_copy(b) for b in sp.rows["l7fp_routes"]]
    assert [r.action for r in rows] == [bs.ACT_PUNT, bs.ACT_FORWARD]
    assert bytes(rows[0].path.b[:rows[0].path.len]) == b"/api" and rows[0].n_hm == 0
    exe = executable_plan(plan)
    assert decide(exe, "l", Request("GET", "/static/x", "any.test")).kind == "forward"
    # every request the punt's part takes goes to Envoy, the authority's as any other
    for host in ("api.test", "other.test"):
        d = decide(exe, "l", Request("GET", "/api/x", host))
        assert (d.kind, d.route) == ("envoy", "api")


def test_slash_plus_what_the_kernel_cannot_evaluate_catches_all() -> None:
    """Prefix "/" and nothing evaluable: every request the kernel decides
    matches the punt, so the later routes are never run (the bookinfo case)."""
    auth = _r("auth", RouteMatch(PathKind.PREFIX, "/", headers=(AUTH,)), Verdict.ENVOY, reason="x")
    assert punt_catches_all(auth)
    plan = listener_plan((auth, _r("rest", RouteMatch(PathKind.PREFIX, "/"))))
    assert _verdicts(plan)[1] == ("rest", Verdict.ENVOY, "kernel decision: after route 'auth', "
                                  "whose kernel punt catches every request")
    # "/" alone is its own matcher (Envoy stops there too): no shadowing
    own = dataclasses.replace(auth, match=RouteMatch(PathKind.PREFIX, "/"))
    assert not punt_catches_all(own)
    assert _verdicts(listener_plan((own, _r("rest", RouteMatch(PathKind.PREFIX, "/")))))[1][1] \
        is Verdict.KERNEL


def test_each_conjunct_on_its_own() -> None:
    inv = HeaderMatch("x-a", StringMatch(StringKind.PREFIX, "v", ignore_case=True), invert=True)
    hop = HeaderMatch("connection", StringMatch(StringKind.EXACT, "close"), evaluable=False)
    method = HeaderMatch(":method", StringMatch(StringKind.EXACT, "POST"))
    lower = HeaderMatch(":method", StringMatch(StringKind.EXACT, "post"))
    q_ok = QueryParamMatch("q", StringMatch(StringKind.EXACT, "1"))
    q_contains = QueryParamMatch("r", StringMatch(StringKind.CONTAINS, "x"))
    m = RouteMatch(PathKind.EXACT, "/a", case_sensitive=False,
                   headers=(AUTH, inv, hop, method), query_params=(q_contains, q_ok),
                   method="POST", grpc=True)
    assert punt_match(m) == RouteMatch(PathKind.EXACT, "/a", case_sensitive=False,
                                       headers=(inv, method), query_params=(q_ok,), method="POST")
    # a :method the kernel does not compare (lower case) is left out, and so is
    # a path regex without a DFA (the headers stay)
    rx = RouteMatch(PathKind.REGEX, "/(a|b)\\1", headers=(lower, inv), method="post")
    assert punt_match(rx) == RouteMatch(PathKind.PREFIX, "", headers=(inv,))


def test_a_classifier_reason_leaves_the_conjunct_out() -> None:
    m, reasons = route_match({"prefix": "/r", "headers": [
        {"name": "x-n", "rangeMatch": {"start": 1, "end": 5}, "invertMatch": True},
        {"name": "x-t", "stringMatch": {"exact": "v"}, "treatMissingHeaderAsEmpty": True},
        {"name": "x-ok", "presentMatch": True}],
        "queryParameters": [{"name": "q", "stringMatch": {"safeRegex": {"regex": "(a)\\1"}}}]})
    assert len(reasons) == 3
    # the inverted range became a bare "absent" check in the IR: evaluating it
    # would not be Envoy's range (and not a superset of it)
    assert [h.evaluable for h in m.headers] == [False, False, True]
    assert [q.evaluable for q in m.query_params] == [False]
    assert punt_match(m) == RouteMatch(PathKind.PREFIX, "/r", headers=(m.headers[2],))


def test_a_rate_limited_route_after_an_overlapping_punt_keeps_envoys_limiter() -> None:
    """A request the punt takes but its route does not match reaches Envoy,
    which routes it on: a later route's bucket must stay Envoy's (rule 3);
    a route whose path the punt's part never matches keeps the kernel's."""
    lim = LocalRateLimit(1, 1, 60_000)
    api = _r("api", RouteMatch(PathKind.PREFIX, "/api", headers=(AUTH,)), Verdict.ENVOY, reason="x")
    plan = listener_plan((api, _r("static", RouteMatch(PathKind.PREFIX, "/static"), rate_limit=lim),
                          _r("apiv2", RouteMatch(PathKind.PREFIX, "/api/v2"), rate_limit=lim),
                          _r("rest", RouteMatch(PathKind.PREFIX, "/"))))
    assert _verdicts(plan)[1:] == [
        ("static", Verdict.KERNEL, ""),
        ("apiv2", Verdict.ENVOY, "kernel decision: rate limit after route 'api', whose kernel "
                                 "punt may hand Envoy requests of this route"),
        ("rest", Verdict.KERNEL, "")]


def test_the_model_stops_at_the_punt_as_the_kernel_does() -> None:
    """The model's forward after a partial punt equals Envoy's first match
    (an evaluable conjunct failed); inside the punt's part it says envoy,
    also where Envoy would go on (the authority differs)."""
    hdr = HeaderMatch("x-v", StringMatch(StringKind.EXACT, "1"))
    api = _r("api", RouteMatch(PathKind.PREFIX, "/api", headers=(AUTH, hdr)), Verdict.ENVOY,
             reason="x")
    plan = listener_plan((api, _r("rest", RouteMatch(PathKind.PREFIX, "/"))))
    got = {(path, hs): decide(plan, "l", Request("GET", path, "other.test", hs)).kind
           for path in ("/api/x", "/x") for hs in ((), (("x-v", "1"),))}
    assert got == {("/api/x", ()): "forward", ("/api/x", (("x-v", "1"),)): "envoy",
                   ("/x", ()): "forward", ("/x", (("x-v", "1"),)): "forward"}


def test_an_exact_punt_hands_envoy_nothing_it_routes_on() -> None:
    """A punt entry that evaluates its whole matcher (an ENVOY route for a
    non-matcher reason) takes exactly Envoy's requests of that route: the
    rate-limited route after it stays KERNEL. A match field the IR does not
    hold (runtime_fraction) makes it inexact, and "/" plus such a field
    catches all."""
    lim = LocalRateLimit(1, 1, 60_000)
    slow = _r("slow", RouteMatch(PathKind.PREFIX, "/api"), Verdict.ENVOY, reason="retry")
    limited = _r("limited", RouteMatch(PathKind.PREFIX, "/"), rate_limit=lim)
    assert _verdicts(listener_plan((slow, limited)))[1] == ("limited", Verdict.KERNEL, "")
    m, reasons = route_match({"prefix": "/api", "runtimeFraction": {"defaultValue": {"numerator": 50}}})
    assert m.unmodelled == ("runtimeFraction",) and reasons == ["route match runtimeFraction"]
    rt = dataclasses.replace(slow, match=m)
    assert _verdicts(listener_plan((rt, limited)))[1][1] is Verdict.ENVOY
    everything = dataclasses.replace(slow, match=dataclasses.replace(m, path="/"))
    assert punt_catches_all(everything)



def test_explain_prints_what_the_punt_entry_keeps(capsys: object) -> None:
    from fastpath.cli_split import _print_punt

    m, _ = route_match({"prefix": "/api", "headers": [
        {"name": ":authority", "stringMatch": {"exact": "api.test"}}]})
    _print_punt(_r("api", m, Verdict.ENVOY, reason="x"))
    _print_punt(_r("slow", RouteMatch(PathKind.PREFIX, "/slow"), Verdict.ENVOY, reason="x"))
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert out == "             kernel punt RouteMatch(path_kind=prefix, path='/api')\n"
