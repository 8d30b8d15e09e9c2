"""fastpath.audit_probe (requests that exercise each KERNEL route) and fastpath.plan_json.

Pure: hand-built plans, the reference model as the judge. The mesh side
(`l7fp mesh audit`) is tests/mesh/test_mesh_audit.py.
"""

from __future__ import annotations

import pytest

from fastpath.audit_probe import FILLER, dfa_examples, inbound_probes, probes
from fastpath.plan import (
    ClusterAction,
    Direction,
    DirectResponse,
    HeaderMatch,
    KernelPlan,
    ListenerPlan,
    PathKind,
    QueryParamMatch,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)
from fastpath.plan_json import PlanJsonError, plan_from_json
from fastpath.reference import decide, route_matches
from fastpath.regex_dfa import compile_dfa

TO_C = ClusterAction((WeightedCluster("c", 1),))


def _route(name: str, match: RouteMatch, verdict: Verdict = Verdict.KERNEL) -> Route:
    return Route(name, match, TO_C, verdict, reason="" if verdict is Verdict.KERNEL else "x")


def _plan(*routes: Route, domains: tuple[str, ...] = ("*",),
          direction: Direction = Direction.OUTBOUND) -> KernelPlan:
    vh = VirtualHost("vh", domains, routes)
    return KernelPlan("n", "v1", (ListenerPlan("l", "198.19.0.2", 80, direction, (vh,)),))


def _by_route(plan: KernelPlan) -> dict[str, object]:
    return {p.route: p for p in probes(plan)}


def test_each_kernel_route_gets_a_request_it_matches_first() -> None:
    plan = _plan(
        _route("punt", RouteMatch(PathKind.PREFIX, "/envoy/"), Verdict.ENVOY),
        _route("exact", RouteMatch(PathKind.EXACT, "/a/b")),
        _route("sep", RouteMatch(PathKind.PATH_SEPARATED_PREFIX, "/sep")),
        _route("lit", RouteMatch(PathKind.REGEX, "^/lit$", regex_literal="/lit")),
        _route("dfa", RouteMatch(PathKind.REGEX, "/d[0-9]+x", regex_dfa=compile_dfa("/d[0-9]+x"))),
        _route("hdr", RouteMatch(PathKind.PREFIX, "/", headers=(
            HeaderMatch("x-v", StringMatch(StringKind.PREFIX, "beta")),
            HeaderMatch("x-no", absent=True)))),
        _route("query", RouteMatch(PathKind.PREFIX, "/", query_params=(
            QueryParamMatch("q", StringMatch(StringKind.EXACT, "1")),))),
        _route("post", RouteMatch(PathKind.PREFIX, "/", method="POST", headers=(
            HeaderMatch(":method", StringMatch(StringKind.EXACT, "POST")),))),
        _route("rest", RouteMatch(PathKind.PREFIX, "/")),
    )
    got = probes(plan)
    assert [p.route for p in got] == ["exact", "sep", "lit", "dfa", "hdr", "query", "post", "rest"]
    for p in got:
        assert p.request is not None, p.skip
        # the reference model chooses exactly this route for the derived request
        lp = plan.listeners[0]
        first = next(r for r in lp.virtual_hosts[0].routes if route_matches(r.match, p.request))
        assert first.name == p.route
        assert decide(plan, "l", p.request).kind == "forward"
        assert p.expect == "forward c" and p.full_name == f"l/vh/{p.route}"
    req = {p.route: p.request for p in got}
    assert req["dfa"].path == "/d0x"  # type: ignore[union-attr]
    assert dict(req["hdr"].headers) == {"x-v": "beta"}  # type: ignore[union-attr]
    assert req["query"].path == "/?q=1"  # type: ignore[union-attr]
    assert req["post"].method == "POST"  # type: ignore[union-attr]


def test_shadowed_route_is_skipped_with_the_route_that_wins() -> None:
    plan = _plan(_route("all", RouteMatch(PathKind.PREFIX, "/")),
                 _route("never", RouteMatch(PathKind.EXACT, "/x")))
    p = _by_route(plan)["never"]
    assert p.request is None and p.skip == "shadowed by route 'all'"  # type: ignore[attr-defined]


def test_prefix_route_behind_an_exact_one_still_gets_a_request() -> None:
    plan = _plan(_route("root", RouteMatch(PathKind.EXACT, "/")),
                 _route("rest", RouteMatch(PathKind.PREFIX, "/")))
    assert _by_route(plan)["rest"].request.path == "/" + FILLER  # type: ignore[attr-defined]


def test_host_is_one_the_virtual_host_selection_gives_to_it() -> None:
    exact = VirtualHost("a", ("a.example:80",), (_route("r", RouteMatch(PathKind.PREFIX, "/")),))
    wild = VirtualHost("w", ("*.example",), (_route("r", RouteMatch(PathKind.PREFIX, "/")),))
    plan = KernelPlan("n", "v1", (ListenerPlan("l", "0.0.0.0", 80, Direction.OUTBOUND,
                                               (exact, wild)),))
    hosts = {p.vhost: p.request.host for p in probes(plan)}  # type: ignore[union-attr]
    assert hosts == {"a": "a.example:80", "w": f"{FILLER}.example"}


def test_inbound_routes_are_skipped_with_why() -> None:
    p = probes(_plan(_route("r", RouteMatch(PathKind.PREFIX, "/")),
                     direction=Direction.INBOUND))[0]
    assert p.request is None and "callers' kernels" in p.skip


def test_a_request_the_kernel_would_hand_over_is_kept_only_when_nothing_better_exists() -> None:
    # "/a/." needs normalisation (Envoy): the prefix's other candidates do not
    plan = _plan(_route("r", RouteMatch(PathKind.PREFIX, "/a/.")))
    p = probes(plan)[0]
    assert p.request is not None and p.expect.startswith("forward")
    assert p.request.path != "/a/."


def test_dfa_examples_are_shortest_and_accepted() -> None:
    dfa = compile_dfa("/v[12]/(a|bc)")
    assert dfa_examples(dfa, list(range(0x21, 0x7F)), limit=2) == ["/v1/a", "/v1/bc"]


def test_plan_json_round_trip_keeps_every_field() -> None:
    route = Route("d", RouteMatch(PathKind.REGEX, "/d[0-9]", regex_dfa=compile_dfa("/d[0-9]"),
                                  headers=(HeaderMatch("x", StringMatch(StringKind.EXACT, "1")),)),
                  DirectResponse(200, "ok"), Verdict.KERNEL)
    plan = _plan(route, _route("c", RouteMatch(PathKind.PREFIX, "/"), Verdict.ENVOY))
    assert plan_from_json(plan.to_json()) == plan


def test_plan_json_names_the_bad_place() -> None:
    bad = _plan(_route("r", RouteMatch(PathKind.PREFIX, "/"))).to_json()
    bad["listeners"][0]["virtual_hosts"][0]["routes"][0]["verdict"] = "MAYBE"
    with pytest.raises(PlanJsonError, match=r"plan.listeners\[0\].virtual_hosts\[0\].routes\[0\]"
                                            r".verdict: 'MAYBE' is no Verdict"):
        plan_from_json(bad)


def test_plan_json_a_pair_of_the_wrong_length_names_its_place() -> None:
    """A fixed-size tuple (a rate-limited reply's header line) with 3 items: a
    PlanJsonError with the place, not zip()'s bare ValueError."""
    from dataclasses import replace

    from fastpath.plan import LocalRateLimit
    limited = replace(_route("r", RouteMatch(PathKind.PREFIX, "/")),
                      rate_limit=LocalRateLimit(1, 1, 1000, response_headers=(("a", "b"),)))
    bad = _plan(limited).to_json()
    assert plan_from_json(bad) == _plan(limited)
    bad["listeners"][0]["virtual_hosts"][0]["routes"][0]["rate_limit"]["response_headers"] = [
        ["a", "b", "c"]]
    with pytest.raises(PlanJsonError, match=r"routes\[0\].rate_limit.response_headers\[0\]: "
                                            r"expected 2 items, got 3"):
        plan_from_json(bad)


def _caller_and_dst() -> tuple[KernelPlan, KernelPlan]:
    from fastpath.plan import Cluster, Endpoint, LbPolicy
    out_routes = (_route("v1-only", RouteMatch(PathKind.PREFIX, "/v1/")),
                  Route("split", RouteMatch(PathKind.PREFIX, "/"), ClusterAction(
                      (WeightedCluster("c", 1), WeightedCluster("other", 1))), Verdict.KERNEL))
    caller = KernelPlan("caller", "v1", (ListenerPlan("out", "198.19.0.2", 9000, Direction.OUTBOUND,
                                                      (VirtualHost("ovh", ("*",), out_routes),)),),
                        (Cluster("c", LbPolicy.RANDOM, (Endpoint("198.18.0.5", 9000),)),
                         Cluster("other", LbPolicy.RANDOM, (Endpoint("198.18.0.6", 9000),))))
    inbound = (_route("in-v1", RouteMatch(PathKind.PREFIX, "/v1/")),
               _route("in-admin", RouteMatch(PathKind.PREFIX, "/admin")),
               _route("in-rest", RouteMatch(PathKind.PREFIX, "/")))
    dst = KernelPlan("dst", "v1", (ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND,
                                                (VirtualHost("ivh", ("*",), inbound),)),))
    return caller, dst


def test_inbound_routes_are_sent_through_a_caller_route_that_reaches_the_pod() -> None:
    caller, dst = _caller_and_dst()
    got = {p.route: p for p in probes_in(dst, caller)}
    assert got["in-v1"].request.path == "/v1/"  # type: ignore[union-attr]
    assert got["in-v1"].via == "out/ovh/v1-only"
    assert got["in-v1"].expect == "forward c, then inbound forward c (destination plan v1)"
    assert (got["in-v1"].address, got["in-v1"].port) == ("198.19.0.2", 9000)
    # only the 50/50 split reaches the rest: kept, and said that the kernel may pick the other
    assert got["in-admin"].via == "out/ovh/split"
    assert got["in-admin"].expect.endswith("(if the kernel picks this pod)")


def test_inbound_route_the_caller_never_forwards_to_the_pod_is_skipped() -> None:
    caller, dst = _caller_and_dst()
    other = [p for p in inbound_probes(dst, 9000, "198.18.0.9", caller, "out", "198.18.0.1")]
    assert other and all(p.request is None and p.skip == "no route of the caller's listener out "
                         "forwards to 198.18.0.9:9000" for p in other)


def test_inbound_route_reached_only_with_the_callers_canary_header() -> None:
    from fastpath.plan import Cluster, Endpoint, LbPolicy
    canary = Route("canary", RouteMatch(PathKind.PREFIX, "/", headers=(
        HeaderMatch("x-canary", StringMatch(StringKind.EXACT, "true")),)),
        ClusterAction((WeightedCluster("v2", 1),)), Verdict.KERNEL)
    rest = _route("rest", RouteMatch(PathKind.PREFIX, "/"))
    caller = KernelPlan("caller", "v1", (ListenerPlan("out", "198.19.0.2", 9000, Direction.OUTBOUND,
                                                      (VirtualHost("ovh", ("*",), (canary, rest)),)),),
                        (Cluster("c", LbPolicy.RANDOM, (Endpoint("198.18.0.5", 9000),)),
                         Cluster("v2", LbPolicy.RANDOM, (Endpoint("198.18.0.6", 9000),))))
    _, dst = _caller_and_dst()
    got = {p.route: p for p in inbound_probes(dst, 9000, "198.18.0.6", caller, "out", "198.18.0.1")}
    assert dict(got["in-v1"].request.headers) == {"x-canary": "true"}  # type: ignore[union-attr]
    assert got["in-v1"].via == "out/ovh/canary"


def probes_in(dst: KernelPlan, caller: KernelPlan) -> list:  # type: ignore[type-arg]
    return inbound_probes(dst, 9000, "198.18.0.5", caller, "out", "198.18.0.1")


def test_inbound_route_behind_a_prefix_rewrite_gets_the_path_before_the_rewrite() -> None:
    from fastpath.plan import Cluster, Endpoint, LbPolicy
    rw = Route("static", RouteMatch(PathKind.PREFIX, "/static/"), ClusterAction(
        (WeightedCluster("c", 1),), prefix_rewrite="/"), Verdict.KERNEL)
    caller = KernelPlan("caller", "v1", (ListenerPlan("out", "198.19.0.2", 9000, Direction.OUTBOUND,
                                                      (VirtualHost("ovh", ("*",), (rw,)),)),),
                        (Cluster("c", LbPolicy.RANDOM, (Endpoint("198.18.0.5", 9000),)),))
    _, dst = _caller_and_dst()
    got = {p.route: p for p in probes_in(dst, caller)}
    assert got["in-admin"].request.path == "/static/admin"  # type: ignore[union-attr]
    assert got["in-v1"].request.path == "/static/v1/"  # type: ignore[union-attr]
    assert got["in-admin"].expect == "forward c, then inbound forward c (destination plan v1)"


def test_a_rewrite_to_a_dot_segment_is_avoided_when_another_path_exists() -> None:
    # rewrite /dd -> /new/. (the destination's sidecar would normalise it: the data
    # path hands it to Envoy); /ddl7fp-audit -> /new/.l7fp-audit is the kernel's
    rw = Route("dd", RouteMatch(PathKind.PREFIX, "/dd"), ClusterAction(
        (WeightedCluster("c", 1),), prefix_rewrite="/new/."), Verdict.KERNEL)
    p = probes(_plan(rw))[0]
    assert p.request is not None and p.request.path == "/dd" + FILLER


def test_authority_and_host_matchers_set_the_host_and_path_matchers_are_skipped() -> None:
    plan = _plan(
        _route("auth", RouteMatch(PathKind.PREFIX, "/a", headers=(HeaderMatch(":authority"),))),
        _route("host", RouteMatch(PathKind.PREFIX, "/h", headers=(
            HeaderMatch("host", StringMatch(StringKind.PREFIX, "h.example")),))),
        _route("path", RouteMatch(PathKind.PREFIX, "/p", headers=(
            HeaderMatch(":path", StringMatch(StringKind.PREFIX, "/p")),))))
    got = _by_route(plan)
    for name in ("auth", "host"):
        req = got[name].request  # type: ignore[attr-defined]
        assert req is not None and not any(n in (":authority", "host") for n, _ in req.headers)
        assert decide(plan, "l", req).route == name
    assert got["host"].request.host.startswith("h.example")  # type: ignore[attr-defined]
    assert got["path"].request is None  # type: ignore[attr-defined]
    assert got["path"].skip == "a :path header matcher: the audit does not derive its value"  # type: ignore[attr-defined]


def test_first_route_and_dot_segments_are_the_reference_models() -> None:
    from fastpath.reference import Request, first_route, has_dot_segments
    plan = _plan(_route("a", RouteMatch(PathKind.PREFIX, "/a")), domains=("h",))
    assert first_route(plan.listeners[0], Request("GET", "/a/x", "h")).name == "a"  # type: ignore[union-attr]
    assert first_route(plan.listeners[0], Request("GET", "/a/x", "other")) is None
    assert [has_dot_segments(p) for p in ("/a//b", "/a/./b", "/a/..", "/a/b?x=/./", "/a.b")] == \
        [True, True, True, False, False]


def test_query_values_envoy_would_decode_or_split_are_not_sent() -> None:
    def q(value: str) -> Route:
        return _route(value, RouteMatch(PathKind.PREFIX, "/", query_params=(
            QueryParamMatch("q", StringMatch(StringKind.EXACT, value)),)))
    got = _by_route(_plan(q("a#b"), q("a%20b"), q("a&b"), q("ok")))
    assert [got[v].request is None for v in ("a#b", "a%20b", "a&b")] == [True] * 3  # type: ignore[attr-defined]
    assert got["ok"].request.path == "/?q=ok"  # type: ignore[attr-defined]


def test_reply_is_the_status_the_kernel_must_answer_whatever_it_samples() -> None:
    """`Probe.reply` (compared with the answer by `l7fp mesh audit`): a direct
    response or a 100% fault abort always answers that status; a sampled abort
    or a rate limit (a bucket other traffic may have spent) does not, nor a forward."""
    from dataclasses import replace

    from fastpath.plan import FaultAbort, LocalRateLimit
    direct = Route("direct", RouteMatch(PathKind.PREFIX, "/d"), DirectResponse(403, "no"),
                   Verdict.KERNEL)
    base = _route("x", RouteMatch(PathKind.PREFIX, "/"))
    got = _by_route(_plan(direct, replace(base, name="abort", match=RouteMatch(PathKind.PREFIX, "/a"),
                                          fault_abort=FaultAbort(503)),
                          replace(base, name="half", match=RouteMatch(PathKind.PREFIX, "/h"),
                                  fault_abort=FaultAbort(503, per_million=500_000)),
                          replace(base, name="limited", match=RouteMatch(PathKind.PREFIX, "/l"),
                                  action=DirectResponse(200, "ok"),
                                  rate_limit=LocalRateLimit(1, 1, 60_000)),
                          base))
    assert {n: p.reply for n, p in got.items()} == {  # type: ignore[attr-defined]
        "direct": 403, "abort": 503, "half": None, "limited": None, "x": None}
