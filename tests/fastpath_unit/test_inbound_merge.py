"""The destinations' inbound listeners merged into a client's plan (fastpath.inbound_merge)."""

from __future__ import annotations

import dataclasses

from fastpath.inbound_merge import is_merged_cluster, merge, merged_name
from fastpath.inbound_verdict import honest_plan
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Direction,
    Endpoint,
    HeaderMatch,
    HeaderValue,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    PathRewrite,
    Permission,
    Principal,
    Rbac,
    RbacPolicy,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)
from fastpath.synth import synthesize

DST = "198.18.0.9"


def _route(cluster: str, name: str = "r", **kw: object) -> Route:
    return Route(name, RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster(cluster, 1),)),
                 Verdict.KERNEL, **kw)  # type: ignore[arg-type]


def client(*adds: HeaderValue) -> KernelPlan:
    vh = VirtualHost("api", ("*",), (_route("out", request_headers_to_add=adds),))
    lp = ListenerPlan("198.19.0.9_9000", "198.19.0.9", 9000, Direction.OUTBOUND, (vh,))
    return KernelPlan("client", "v1", (lp,), (Cluster("out", LbPolicy.ROUND_ROBIN, (Endpoint(DST, 9000),)),))


def dest(*routes: Route, **kw: object) -> KernelPlan:
    vh = VirtualHost("inbound|http|9000", ("*",), routes or (_route("inbound|9000||"),))
    lp = ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND, (vh,),
                      route_config="inbound|9000||", **kw)  # type: ignore[arg-type]
    app = Cluster("inbound|9000||", LbPolicy.ROUND_ROBIN, (Endpoint("127.0.0.1", 9000),))
    return KernelPlan("dest", "d1", (lp,), (app,))


DENY = Rbac("DENY", (RbacPolicy("no-admin", ((Permission(path=None, headers=(
    HeaderMatch("x-admin"),)),),), ((Principal(any=True),),)),))


def test_transparent_destination_needs_nothing() -> None:
    got = merge(client(), lambda ip: dest())
    assert got.plan == client() and not got.merged and got.offloadable(DST, 9000)


def test_unknown_destination_is_not_offloaded() -> None:
    got = merge(client(), lambda ip: None)
    assert not got.offloadable(DST, 9000) and "no known plan" in got.refused[(DST, 9000)]


def test_rbac_destination_is_merged_under_its_own_names() -> None:
    got = merge(client(), lambda ip: dest(rbac=DENY, rbacs=(DENY,)))
    assert got.offloadable(DST, 9000) and got.merged == {(DST, 9000): merged_name(DST, 9000)}
    # which plan of the destination was merged (/debug/fastpath "inbound_plans", mesh audit)
    assert got.versions == {(DST, 9000): dest().version}
    lp = next(lp for lp in got.plan.listeners if lp.name == merged_name(DST, 9000))
    target = lp.virtual_hosts[0].routes[0].action
    assert isinstance(target, ClusterAction)
    name = target.clusters[0].name
    assert is_merged_cluster(name) and got.plan.cluster(name) is not None
    assert got.plan.version != client().version
    sp = synthesize(got.plan)  # one set of tables: both listeners have an id
    assert merged_name(DST, 9000) in sp.listener_ids and "198.19.0.9_9000" in sp.listener_ids


def test_listener_rate_limit_stays_with_envoy() -> None:
    got = merge(client(), lambda ip: dest(local_rate_limit=LocalRateLimit(5, 5, 1000)))
    assert not got.offloadable(DST, 9000) and "rate limit" in got.refused[(DST, 9000)]


def test_route_rate_limit_becomes_a_punt() -> None:
    limited = _route("inbound|9000||", "limited", rate_limit=LocalRateLimit(5, 5, 1000))
    got = merge(client(), lambda ip: dest(dataclasses.replace(
        limited, match=RouteMatch(PathKind.PREFIX, "/v1/")), _route("inbound|9000||")))
    lp = next(lp for lp in got.plan.listeners if lp.name == merged_name(DST, 9000))
    assert [r.verdict for r in lp.virtual_hosts[0].routes] == [Verdict.ENVOY, Verdict.KERNEL]


def test_inbound_reading_a_header_the_outbound_side_adds_is_not_merged() -> None:
    got = merge(client(HeaderValue("x-admin", "1")), lambda ip: dest(rbac=DENY, rbacs=(DENY,)))
    assert not got.offloadable(DST, 9000) and "x-admin" in got.refused[(DST, 9000)]
    env = merge(client(), lambda ip: dest(rbac=dataclasses.replace(DENY, policies=(RbacPolicy(
        "p", ((Permission(headers=(HeaderMatch("x-request-id"),)),),), ((Principal(any=True),),)),))))
    assert not env.offloadable(DST, 9000)  # the client's Envoy adds x-request-id


def test_inbound_reading_the_original_path_is_not_merged_under_a_rewrite() -> None:
    """A client rewrite route adds x-envoy-original-path and changes :path."""
    reads = dataclasses.replace(DENY, policies=(RbacPolicy("p", ((Permission(headers=(
        HeaderMatch("x-envoy-original-path"),)),),), ((Principal(any=True),),)),))
    plain = merge(client(), lambda ip: dest(rbac=reads, rbacs=(reads,)))
    assert plain.offloadable(DST, 9000)
    c = client()
    r = c.listeners[0].virtual_hosts[0].routes[0]
    rw = dataclasses.replace(r, action=dataclasses.replace(r.action, prefix_rewrite="/v2/"))
    c = dataclasses.replace(c, listeners=(dataclasses.replace(c.listeners[0], virtual_hosts=(
        dataclasses.replace(c.listeners[0].virtual_hosts[0], routes=(rw,)),)),))
    got = merge(c, lambda ip: dest(rbac=reads, rbacs=(reads,)))
    assert not got.offloadable(DST, 9000) and "x-envoy-original-path" in got.refused[(DST, 9000)]


def test_inbound_path_rewrite_becomes_a_punt() -> None:
    """The data path rewrites by the outbound route only: an inbound route's
    own prefix_rewrite or regex_rewrite is Envoy's (the app would get the
    path unrewritten)."""
    def rewriting(name: str, prefix: str, **kw: object) -> Route:
        r = _route("inbound|9000||", name)
        return dataclasses.replace(r, match=RouteMatch(PathKind.PREFIX, prefix),
                                   action=dataclasses.replace(r.action, **kw))  # type: ignore[arg-type]

    got = merge(client(), lambda ip: dest(
        rewriting("pre", "/a/", prefix_rewrite="/b/"),
        rewriting("re", "/c/", path_rewrite=PathRewrite("/d/", 3, "/c/")),
        _route("inbound|9000||")))
    lp = next(lp for lp in got.plan.listeners if lp.name == merged_name(DST, 9000))
    routes = lp.virtual_hosts[0].routes
    assert [r.verdict for r in routes] == [Verdict.ENVOY, Verdict.ENVOY, Verdict.KERNEL]
    assert all("inbound path rewrite" in r.reason for r in routes[:2])


DECO = HeaderValue("x-envoy-decorator-operation", "op", append=True)  # fastpath.classify's egress add
OTHER = "198.18.0.10"


def _traced_client(*dests: str, sampling: int | None = 3000, egress: bool = True) -> KernelPlan:
    """client() with tracing on its listener (an OUTBOUND one's decorator
    add) and its cluster's endpoints at `dests`."""
    plan = client(DECO)
    lp = dataclasses.replace(plan.listeners[0], trace_sampling=sampling, trace_egress=egress)
    out = Cluster("out", LbPolicy.ROUND_ROBIN, tuple(Endpoint(ip, 9000) for ip in dests))
    return dataclasses.replace(plan, listeners=(lp,), clusters=(out,))


def _adds(plan: KernelPlan) -> list[str]:
    return [h.name for h in plan.listeners[0].virtual_hosts[0].routes[0].request_headers_to_add]


def test_inbound_tracing_merged_behind_the_same_sampling_without_the_decorator() -> None:
    traced = dest(trace_sampling=3000)
    got = merge(_traced_client(DST), lambda ip: traced)
    assert got.merged == {(DST, 9000): merged_name(DST, 9000)} and not got.refused
    assert _adds(got.plan) == []  # the inbound sidecar takes it off the request
    # a transparent inbound side otherwise: the decorator stays
    assert _adds(merge(_traced_client(DST), lambda ip: dest()).plan) == [DECO.name]


def test_inbound_tracing_refused_behind_another_caller() -> None:
    traced = dest(trace_sampling=3000)
    # a caller sampling more than the inbound side's random_sampling: kept as it is
    assert not merge(_traced_client(DST, sampling=6000), lambda ip: traced).refused
    again = "inbound tracing samples the caller's ids again"
    assert f"{again}: 2000/10000 arrive sampled" in merge(  # its overall_sampling unmarks some
        _traced_client(DST), lambda ip: dest(trace_sampling=2000, trace_overall=2000)).refused[(DST, 9000)]
    for plan, why in ((_traced_client(DST, sampling=1000), f"{again}: 3000/10000 arrive sampled"),
                      (_traced_client(DST, sampling=None, egress=False), "not an OUTBOUND tracing"),
                      (_traced_client(DST, egress=False), "not an OUTBOUND tracing")):
        got = merge(plan, lambda ip: traced)
        assert why in got.refused[(DST, 9000)], got.refused
    # the caller's view (/debug/fastpath/plans): its route names the destination's cause
    view = honest_plan(_traced_client(DST, sampling=1000), lambda ip: traced)
    r = view.listeners[0].virtual_hosts[0].routes[0]
    assert r.verdict is Verdict.ENVOY and again in r.reason, r
    zipkin = dest(trace_sampling=3000, trace_provider="zipkin")
    assert "provider zipkin" in merge(_traced_client(DST), lambda ip: zipkin).refused[(DST, 9000)]
    # a decorated route to a tracing and a non-tracing inbound side: the
    # line stays for the second, so the first is refused
    got = merge(_traced_client(DST, OTHER), lambda ip: traced if ip == DST else dest())
    assert "another destination of the route keeps" in got.refused[(DST, 9000)], got.refused
    assert got.offloadable(OTHER, 9000) and _adds(got.plan) == [DECO.name]


def test_a_route_to_a_tls_cluster_too_drops_the_decorator_the_kernels_destination_strips() -> None:
    """trace_refusal and the header drop look at the same endpoints of a route
    (the kernel's: a TLS cluster's requests go to Envoy). They did not: the drop
    also counted the TLS cluster's endpoint, whose inbound side keeps the line,
    so the line stayed while the merge let the kernel deliver past DST's
    sidecar, which takes it off."""
    plan = _traced_client(DST)
    wc = (WeightedCluster("out", 1), WeightedCluster("tls", 1))
    lp = plan.listeners[0]
    r = dataclasses.replace(lp.virtual_hosts[0].routes[0], action=ClusterAction(wc))
    lp = dataclasses.replace(lp, virtual_hosts=(dataclasses.replace(lp.virtual_hosts[0], routes=(r,)),))
    tls = Cluster("tls", LbPolicy.ROUND_ROBIN, (Endpoint(OTHER, 9000),), tls=True)
    plan = dataclasses.replace(plan, listeners=(lp,), clusters=(*plan.clusters, tls))
    traced = dest(trace_sampling=3000)
    got = merge(plan, lambda ip: traced if ip == DST else dest())
    assert got.merged == {(DST, 9000): merged_name(DST, 9000)} and not got.refused
    assert _adds(got.plan) == []
