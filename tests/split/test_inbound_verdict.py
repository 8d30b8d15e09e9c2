"""Verdicts that know the destinations' inbound side (fastpath.inbound_verdict):
a client route every request of which the data path hands to Envoy because of
the destination's inbound side is ENVOY; a partly affected one stays KERNEL."""

from __future__ import annotations

import dataclasses

from fastpath.inbound_verdict import honest_plan
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Direction,
    Endpoint,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)

A, B = "198.18.0.9", "198.18.0.10"
CLUSTER = "outbound|9000||api.k3.svc.cluster.local"
OTHER = "outbound|9000||api-v2.k3.svc.cluster.local"
LIMIT = LocalRateLimit(5, 5, 3_600_000)


def _route(name: str, path: str, *clusters: tuple[str, int], kind: PathKind = PathKind.PREFIX,
           **kw: object) -> Route:
    return Route(name, RouteMatch(kind, path), ClusterAction(tuple(
        WeightedCluster(c, w) for c, w in clusters)), Verdict.KERNEL, **kw)  # type: ignore[arg-type]


def client(*routes: Route) -> KernelPlan:
    vh = VirtualHost("api", ("*",), routes)
    lp = ListenerPlan("198.19.0.9_9000", "198.19.0.9", 9000, Direction.OUTBOUND, (vh,))
    return KernelPlan("client", "v1", (lp,), (
        Cluster(CLUSTER, LbPolicy.ROUND_ROBIN, (Endpoint(A, 9000),)),
        Cluster(OTHER, LbPolicy.ROUND_ROBIN, (Endpoint(B, 9000),))))


def dest(*routes: Route, **kw: object) -> KernelPlan:
    vh = VirtualHost("inbound|http|9000", ("*",), routes or (_route("in", "/", ("app", 1)),))
    lp = ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND, (vh,),
                      route_config="inbound|9000||", **kw)  # type: ignore[arg-type]
    return KernelPlan("dest", "d1", (lp,), (Cluster("app", LbPolicy.ROUND_ROBIN,
                                                    (Endpoint("127.0.0.1", 9000),)),))


def limited_v1() -> KernelPlan:
    """api's inbound side of tests/kernel_differential/policies.yaml: /v1/ limited."""
    return dest(_route("in-v1-limited", "/v1/", ("app", 1), rate_limit=LIMIT),
                _route("in-default", "/", ("app", 1)))


def verdicts(plan: KernelPlan) -> dict[str, tuple[Verdict, str]]:
    return {r.name: (r.verdict, r.reason) for lp in plan.listeners
            for vh in lp.virtual_hosts for r in vh.routes}


def test_listener_rate_limit_makes_every_route_to_it_envoy() -> None:
    """The demo's unique-id: no client kernel gets a pool for it (no_pool)."""
    plans = {A: dest(local_rate_limit=LIMIT), B: dest()}
    got = verdicts(honest_plan(client(_route("to-api", "/", (CLUSTER, 1)),
                                      _route("to-v2", "/", (OTHER, 1))), plans.get))
    assert got["to-api"] == (Verdict.ENVOY, "destination api: inbound local rate limit "
                             "(its bucket is the destination's Envoy's)")
    assert got["to-v2"] == (Verdict.KERNEL, "")
    own = verdicts(honest_plan(plans[A], plans.get))
    assert own["in"][0] is Verdict.ENVOY and "inbound local rate limit" in own["in"][1]


def test_inbound_route_punt_covering_the_route_makes_it_envoy() -> None:
    """k3's `pinned` (GET /v1/, api 100 / api-v2 0) and api's inbound /v1/ limit."""
    plans = {A: limited_v1(), B: dest()}
    pinned = _route("pinned", "/v1/", (CLUSTER, 100), (OTHER, 0))
    got = verdicts(honest_plan(client(pinned, _route("split", "/", (CLUSTER, 50), (OTHER, 50)),
                                      _route("v1x", "/v1/x", (CLUSTER, 1), kind=PathKind.EXACT)),
                               plans.get))
    want = "destination api: inbound route 'in-v1-limited': inbound rate limit (Envoy owns the bucket)"
    assert got["pinned"] == (Verdict.ENVOY, want)
    assert got["v1x"] == (Verdict.ENVOY, want)  # an exact path under the limited prefix
    assert got["split"] == (Verdict.KERNEL, "")  # partly: only /v1/ and only api's half
    own = verdicts(honest_plan(plans[A], plans.get))
    assert own["in-v1-limited"][0] is Verdict.ENVOY and own["in-default"][0] is Verdict.KERNEL


def test_partial_cases_stay_kernel() -> None:
    plans = {A: limited_v1(), B: dest()}
    cases = [
        _route("all", "/", (CLUSTER, 1)),  # /v1/ is only part of /
        _route("v", "/v", (CLUSTER, 1)),  # /v2 goes past the punt to in-default
        _route("half", "/v1/", (CLUSTER, 50), (OTHER, 50)),  # api-v2 is served
        _route("own-limit", "/v1/", (CLUSTER, 1), rate_limit=LIMIT),  # the kernel's 429
    ]
    got = verdicts(honest_plan(client(*cases), plans.get))
    assert {n: v for n, (v, _) in got.items()} == {r.name: Verdict.KERNEL for r in cases}


def test_an_earlier_overlapping_inbound_route_keeps_kernel() -> None:
    """The first inbound route that may match decides: one the kernel serves
    for some of the route's requests keeps the route KERNEL."""
    first = _route("in-v1-get", "/v1/", ("app", 1))
    first = dataclasses.replace(first, match=dataclasses.replace(first.match, method="GET"))
    plans = {A: dest(first, *limited_v1().listeners[0].virtual_hosts[0].routes)}
    got = verdicts(honest_plan(client(_route("pinned", "/v1/", (CLUSTER, 1))), plans.get))
    assert got["pinned"][0] is Verdict.KERNEL


def test_unknown_destination_keeps_kernel_and_inline_has_no_merge() -> None:
    plan = client(_route("pinned", "/v1/", (CLUSTER, 1)))
    assert honest_plan(plan, lambda ip: None) is plan  # no plan yet: transient
    got = verdicts(honest_plan(plan, {A: limited_v1()}.get, decide="inline"))
    assert got["pinned"][0] is Verdict.ENVOY and "inline" in got["pinned"][1]


def test_a_client_listener_that_may_answer_keeps_kernel() -> None:
    """A listener-level limit on the client's side: the kernel's 429 for some."""
    plan = client(_route("pinned", "/v1/", (CLUSTER, 1)))
    plan = dataclasses.replace(plan, listeners=(dataclasses.replace(
        plan.listeners[0], local_rate_limit=LIMIT),))
    assert honest_plan(plan, {A: limited_v1()}.get) is plan


def _rewrite_plan(value: str, merged: bool) -> KernelPlan:
    """client's /v1/ route rewritten to `value` (prefix_rewrite) toward api at
    A; with `merged`, api's inbound listener merged (an inbound decision)."""
    from fastpath.inbound_merge import merge

    r = _route("rw", "/v1/", (CLUSTER, 1))
    r = dataclasses.replace(r, action=dataclasses.replace(r.action, prefix_rewrite=value))
    plan = client(r)
    return merge(plan, {A: limited_v1()}.get).plan if merged else plan


def test_reference_model_punts_a_rewritten_path_with_dot_segments() -> None:
    """decide_datapath as dp_msg_rwin / dp_rw_dotseg: with an inbound decision,
    a rewritten path the inbound sidecar may normalize goes to Envoy."""
    from fastpath.reference import Request, decide_datapath

    def kind(value: str, path: str, merged: bool = True) -> tuple[str, str]:
        d = decide_datapath(_rewrite_plan(value, merged), "198.19.0.9_9000",
                            Request("GET", path, "api"))
        return d.kind, d.reason if d.kind == "envoy" else d.path

    for value, path in [("/a/./", "/v1/x"), ("/a/../", "/v1/x"),
                        ("/a/.", "/v1/"), ("/a/..", "/v1/"), ("a/", "/v1/x"),
                        ("/a//", "/v1/x")]:
        assert kind(value, path) == ("envoy", "path_rewrite"), (value, path)
        assert kind(value, path, merged=False)[0] == "forward"  # no inbound decision
    assert kind("/a/", "/v1/x?q=/./") == ("forward", "/a/x?q=/./")  # the query is not the path
    assert kind("/a.b/", "/v1/x") == ("forward", "/a.b/x")


def test_an_inbound_punt_that_catches_every_request_makes_any_route_envoy() -> None:
    """An inbound / route with an :authority matcher: the kernel cannot
    evaluate the header, so its punt catches every request (synth_tables._punt),
    a client route to /y included; with /x instead of /, the punt keeps /x
    (synth_punt): /y stays KERNEL, /x/z is ENVOY; a punt with its own matcher
    does not catch /y either."""
    from fastpath.plan import HeaderMatch, StringKind, StringMatch

    auth = _route("in-x-auth", "/", ("app", 1))
    auth = dataclasses.replace(auth, verdict=Verdict.ENVOY, reason="authority matcher",
                               match=dataclasses.replace(auth.match, headers=(HeaderMatch(
                                   ":authority", StringMatch(StringKind.EXACT, "api")),)))
    plans = {A: dest(auth, _route("in-default", "/", ("app", 1)))}
    got = verdicts(honest_plan(client(_route("to-y", "/y", (CLUSTER, 1))), plans.get))
    assert got["to-y"] == (Verdict.ENVOY, "destination api: inbound route 'in-x-auth': "
                           "authority matcher")
    auth = dataclasses.replace(auth, match=dataclasses.replace(auth.match, path="/x"))
    plans = {A: dest(auth, _route("in-default", "/", ("app", 1)))}
    got = verdicts(honest_plan(client(_route("to-y", "/y", (CLUSTER, 1)),
                                      _route("to-x", "/x/z", (CLUSTER, 1))), plans.get))
    assert got["to-y"] == (Verdict.KERNEL, "")
    assert got["to-x"] == (Verdict.ENVOY, "destination api: inbound route 'in-x-auth': "
                           "authority matcher")
    own = dataclasses.replace(auth, match=dataclasses.replace(auth.match, headers=()))
    plans = {A: dest(own, _route("in-default", "/", ("app", 1)))}
    got = verdicts(honest_plan(client(_route("to-y", "/y", (CLUSTER, 1))), plans.get))
    assert got["to-y"] == (Verdict.KERNEL, "")


def test_the_view_of_an_inbound_side_takes_the_clients_decision() -> None:
    """Agent.plan_view: the clients merge a pod's inbound side, so their
    decision counts, not the pod's own (one fell back to inline here)."""
    from types import SimpleNamespace

    from fastpath.agent import Agent
    from fastpath.agent_node import PodInfo

    def view(client_mode: str, dest_mode: str) -> dict[str, tuple[Verdict, str]]:
        a = Agent(None, decide="l7fp")
        a.pods = {"c": PodInfo("c", "c", "/cg/c", None, B), "d": PodInfo("d", "d", "/cg/d", None, A)}
        a.plans = {"c": client(_route("to-api", "/", (CLUSTER, 1))), "d": limited_v1()}
        a.nodes = {"c": SimpleNamespace(mode=client_mode),  # type: ignore[dict-item]
                   "d": SimpleNamespace(mode=dest_mode)}
        plan = a.plan_view("d")
        assert plan is not None
        return verdicts(plan)

    got = view("l7fp", "inline")
    assert got["in-default"] == (Verdict.KERNEL, "")  # l7fp clients merge and serve it
    assert got["in-v1-limited"][0] is Verdict.ENVOY
    got = view("inline", "l7fp")
    assert got["in-default"][0] is Verdict.ENVOY and "inline" in got["in-default"][1]


def test_a_tracing_inbound_side_every_caller_refuses_is_envoy_in_the_agents_view() -> None:
    """The split alone says KERNEL for a tracing inbound listener (its callers
    decide the merge). The agent knows them: when every caller that reaches it
    refuses it (here: one without tracing), all its requests go through Envoy
    and the view says so, with trace_refusal's reason; one caller that merges
    it keeps it KERNEL."""
    from types import SimpleNamespace

    from fastpath.agent import Agent
    from fastpath.agent_node import PodInfo

    def traced(plan: KernelPlan, sampling: int | None) -> KernelPlan:
        lp = dataclasses.replace(plan.listeners[0], trace_sampling=sampling,
                                 trace_egress=sampling is not None)
        return dataclasses.replace(plan, listeners=(lp,))

    def view(*samplings: int | None) -> dict[str, tuple[Verdict, str]]:
        a = Agent(None, decide="l7fp")
        a.pods = {"d": PodInfo("d", "d", "/cg/d", None, A)}
        a.plans = {"d": dest(trace_sampling=3000)}
        for i, n in enumerate(samplings):
            a.pods[f"c{i}"] = PodInfo(f"c{i}", f"c{i}", f"/cg/c{i}", None, f"198.18.1.{i}")
            a.plans[f"c{i}"] = traced(client(_route("to-api", "/", (CLUSTER, 1))), n)
        a.nodes = {n: SimpleNamespace(mode="l7fp") for n in a.plans}  # type: ignore[misc]
        plan = a.plan_view("d")
        assert plan is not None
        return verdicts(plan)

    assert view() == {"in": (Verdict.KERNEL, "")}  # no caller: nothing known
    assert view(3000) == {"in": (Verdict.KERNEL, "")}  # the same sampling: merged
    assert view(3000, None) == {"in": (Verdict.KERNEL, "")}  # one caller merges it
    got = view(None, 1000)
    assert got["in"][0] is Verdict.ENVOY, got
    assert got["in"][1].startswith("every client kernel hands it to Envoy: inbound tracing "
                                   "behind client listener 198.19.0.9_9000 that is not an "
                                   "OUTBOUND tracing listener"), got
    assert got["in"][1].endswith("(and 1 other caller(s) refuse it)"), got
