"""Fault delays -> plan.FaultDelay and the verdict (fastpath.classify_delay), the
reference model's delay and the residual (Envoy keeps sampling what it gets)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fastpath import envoy_model as em
from fastpath.classify_delay import delay_of, runtime_of
from fastpath.classify_route import KernelCaps
from fastpath.coverage import analyse
from fastpath.plan import FaultDelay, Verdict
from fastpath.reference import Request, decide
from fastpath.split import split_snapshot
from tests.split.test_classify import CLUSTER, fwd, listener

ON = KernelCaps(fault_delays=True)
FAULT_T = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def fault(**cfg: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_T, **cfg}}


def delay(ms: str = "0.3s", num: int = 100, denom: str = "HUNDRED") -> dict[str, Any]:
    return {"fixed_delay": ms, "percentage": {"numerator": num, "denominator": denom}}


def plan_routes(routes: list[dict[str, Any]], filters: list[dict[str, Any]],
                caps: KernelCaps = ON) -> Any:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener(routes, filters))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    result = split_snapshot("n", res, caps)
    return result, result.plan.listeners[0].virtual_hosts[0].routes


def per_route(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"envoy.filters.http.fault": {"@type": FAULT_T, **cfg}}


def test_delay_of_percentages_and_denominators() -> None:
    assert delay_of({"delay": {"fixedDelay": "7s", "percentage": {"numerator": 50}}}) == (
        FaultDelay(7000, 500_000), [])
    assert delay_of({"delay": {"fixedDelay": "0.3s", "percentage": {
        "numerator": 25, "denominator": "TEN_THOUSAND"}}}) == (FaultDelay(300, 2_500), [])
    # 0 % (or no delay) never delays: nothing for Envoy to do that the kernel doesn't
    assert delay_of({"delay": {"fixedDelay": "3s", "percentage": {"numerator": 0}}}) == (None, [])
    assert delay_of({"abort": {"httpStatus": 503, "percentage": {"numerator": 1}}}) == (None, [])
    _, why = delay_of({"delay": {"headerDelay": {}, "percentage": {"numerator": 100}}})
    assert why == ["fault delay from request headers (header_delay)"]
    # with an abort: KERNEL (the abort's reply waits for the delay, dp_delay_reply)
    assert delay_of({"delay": {"fixedDelay": "1s", "percentage": {"numerator": 1}},
                     "abort": {"httpStatus": 500, "percentage": {"numerator": 1}}}) == (
        FaultDelay(1000, 10_000), [])
    _, why = delay_of({"delay": {"fixedDelay": "1s", "percentage": {"numerator": 1}},
                       "abort": {"httpStatus": 500, "percentage": {"numerator": 0}},
                       "maxActiveFaults": 3})
    assert why == ["fault filter max_active_faults (Envoy counts active faults)"]


def test_istio_style_per_route_delay_is_kernel() -> None:
    r = fwd(timeout="0s")
    r["typed_per_filter_config"] = per_route({"delay": {
        "fixedDelay": "7s", "percentage": {"numerator": 500000, "denominator": "MILLION"}}})
    _, (route,) = plan_routes([r], [fault()])
    assert (route.verdict, route.reason) == (Verdict.KERNEL, "")
    assert route.fault_delay == FaultDelay(7000, 500_000)
    _, (route,) = plan_routes([r], [fault()], KernelCaps(fault_delays=False))
    assert route.verdict is Verdict.ENVOY and route.reason == "fault filter delay"


def test_what_stays_envoy() -> None:
    # Envoy's 15 s default route timeout: its timer starts after the delay
    _, (route,) = plan_routes([fwd()], [fault(delay=delay())])
    assert route.verdict is Verdict.ENVOY
    assert "route timeout 15000ms with fault delay" in route.reason
    # a direct response is the router's, after the delay
    dr = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    _, (route,) = plan_routes([dr], [fault(delay=delay())])
    assert "fault delay before a direct response or redirect" in route.reason
    # a mirror: Envoy's router shadows after the delay
    r = fwd(timeout="0s", request_mirror_policies=[{"cluster": "c"}])
    r["typed_per_filter_config"] = per_route({"delay": delay()})
    _, (route,) = plan_routes([r], [fault()])
    assert "fault delay with request mirroring" in route.reason
    # a local rate limit after the fault filter takes its token after the delay
    rl = {"name": "rl", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rl"}}
    _, (route,) = plan_routes([fwd(timeout="0s")], [fault(delay=delay()), rl])
    assert "local rate limit after a fault delay" in route.reason
    # an RBAC filter after the fault filter denies after the delay; before it, at once
    rbac = {"name": "rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "DENY", "policies": {"p": {
            "permissions": [{"url_path": {"path": {"prefix": "/x"}}}],
            "principals": [{"any": True}]}}}}}
    r = fwd(timeout="0s")
    r["typed_per_filter_config"] = per_route({"delay": delay()})
    _, (route,) = plan_routes([r], [fault(), rbac])
    assert "RBAC after a fault delay" in route.reason
    _, (route,) = plan_routes([r], [rbac, fault()])
    assert route.verdict is Verdict.KERNEL and route.fault_delay is not None


def test_hcm_level_delay_keeps_requests_without_route_with_envoy() -> None:
    only_a = {**fwd(timeout="0s"), "match": {"prefix": "/a"}}  # "/b" has no route
    result, (route,) = plan_routes([only_a], [fault(delay=delay())])
    lp = result.plan.listeners[0]
    assert lp.verdict is Verdict.ENVOY
    assert "fault delay for requests without a route" in lp.reason
    # 0 % at the HCM: nothing to delay
    result, (route,) = plan_routes([only_a], [fault(delay=delay(num=0))])
    assert result.plan.listeners[0].verdict is Verdict.KERNEL


def test_hcm_level_delay_with_a_catch_all_route_is_the_kernels() -> None:
    """A "*" virtual host containing a prefix "/" route leaves no request without a
    route: the HCM delay is the route's (the demo's `text` listener, found ENVOY
    by `l7fp mesh audit`); a header matcher on the last route brings it back."""
    result, (route,) = plan_routes([fwd(timeout="0s")], [fault(delay=delay())])
    assert result.plan.listeners[0].verdict is Verdict.KERNEL
    assert route.verdict is Verdict.KERNEL and route.fault_delay is not None
    hdr = {**fwd(timeout="0s"), "match": {"prefix": "/", "headers": [
        {"name": "x", "string_match": {"exact": "1"}}]}}
    result, _ = plan_routes([hdr], [fault(delay=delay())])
    assert result.plan.listeners[0].verdict is Verdict.ENVOY
    # a catch-all anywhere (routes after it are unreachable) routes every request too
    mid = [fwd(timeout="0s"), {**fwd(timeout="0s"), "match": {"prefix": "/a"}}]
    result, _ = plan_routes(mid, [fault(delay=delay())])
    assert result.plan.listeners[0].verdict is Verdict.KERNEL


def listener_verdict(vhosts: list[dict[str, Any]]) -> Verdict:
    """The verdict of a listener with these virtual hosts and an HCM-level delay."""
    lst = listener([], [fault(delay=delay())])
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"] = vhosts
    res = {em.LISTENER: [em.parse(em.LISTENER, lst)], em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    return split_snapshot("n", res, ON).plan.listeners[0].verdict


def test_hcm_level_delay_needs_a_star_host_and_a_catch_all_in_each() -> None:
    """A request misses every route (the HCM delay applies, Envoy's) when no
    virtual host takes its Host, or when the one that does has no catch-all."""
    catch = [fwd(timeout="0s")]
    only_a = [{**fwd(timeout="0s"), "match": {"prefix": "/a"}}]
    assert listener_verdict([{"name": "w", "domains": ["web"], "routes": catch}]) is Verdict.ENVOY
    assert listener_verdict([{"name": "w", "domains": ["web"], "routes": catch},
                             {"name": "s", "domains": ["*"], "routes": only_a}]) is Verdict.ENVOY
    assert listener_verdict([{"name": "w", "domains": ["web"], "routes": only_a},
                             {"name": "s", "domains": ["*"], "routes": catch}]) is Verdict.ENVOY
    assert listener_verdict([{"name": "w", "domains": ["web"], "routes": catch},
                             {"name": "s", "domains": ["*"], "routes": catch}]) is Verdict.KERNEL


def test_residual_keeps_the_fault_filter() -> None:
    """Envoy samples the requests the kernel hands it: the residual keeps the delay."""
    r = fwd(timeout="0s")
    r["typed_per_filter_config"] = per_route({"delay": delay()})
    result, (route,) = plan_routes([r], [fault()])
    assert route.verdict is Verdict.KERNEL
    hcm = em.to_json(result.residual[em.LISTENER][0])["filterChains"][0]["filters"][0]
    rc = hcm["typedConfig"]["routeConfig"]
    kept = rc["virtualHosts"][0]["routes"][0]["typedPerFilterConfig"]["envoy.filters.http.fault"]
    assert kept["delay"] == {"fixedDelay": "0.300s", "percentage": {"numerator": 100}}


def test_runtime_layers_keep_faults_with_envoy(tmp_path: Path) -> None:
    assert runtime_of({"layered_runtime": {"layers": [
        {"name": "static", "static_layer": {}}]}}) == ""
    assert runtime_of({"layered_runtime": {"layers": [
        {"name": "d", "disk_layer": {"symlink_root": "/srv"}}]}}) == "layered_runtime disk_layer d"
    boot = tmp_path / "envoy.yaml"
    boot.write_text("""
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 9211}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config:
            virtual_hosts:
            - {name: s, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: c, timeout: 0s}}]}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {http_status: 503, percentage: {numerator: 0}}
              delay: {fixed_delay: 3s, percentage: {numerator: 0}}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: c
    type: STATIC
    load_assignment:
      cluster_name: c
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 198.18.0.9, port_value: 80}}}}]}]
""")
    rows = analyse([str(boot)], ON).routes
    assert [r.verdict for r in rows] == ["KERNEL"]
    layer = "layered_runtime:\n  layers:\n  - name: d0\n    disk_layer: {symlink_root: /srv/runtime}\n"
    with_layer = tmp_path / "envoy-runtime.yaml"  # inputs.load_yaml caches by path
    with_layer.write_text(boot.read_text() + layer)
    rows = analyse([str(with_layer)], ON).routes
    assert [(r.verdict, r.reason) for r in rows] == [
        ("ENVOY", "fault percentages may come from the runtime (layered_runtime disk_layer d0)")]


def test_reference_delays_the_sampled_share_of_forwards() -> None:
    r = fwd(timeout="0s")
    r["typed_per_filter_config"] = per_route({"delay": delay("0.3s", 30)})
    result, _ = plan_routes([r], [fault()])
    rng = random.Random(7)
    req = Request("GET", "/x", "a")
    got = [decide(result.plan, "l", req, rng) for _ in range(2000)]
    assert {d.kind for d in got} == {"forward"}
    delays = [d.delay_ms for d in got]
    assert set(delays) == {0, 300}
    assert 500 < delays.count(300) < 700  # 30 % of 2000, well inside 5 sigma


def test_reference_delays_an_abort_after_the_delay() -> None:
    r = fwd(timeout="0s")
    r["typed_per_filter_config"] = per_route({"delay": delay("0.3s", 50),
                                              "abort": {"httpStatus": 503,
                                                        "percentage": {"numerator": 50}}})
    result, (route,) = plan_routes([r], [fault()])
    assert route.verdict is Verdict.KERNEL and route.fault_abort is not None
    rng = random.Random(3)
    got = [decide(result.plan, "l", Request("GET", "/x", "a"), rng) for _ in range(4000)]
    kinds = {(d.kind, d.delay_ms) for d in got}
    assert kinds == {("reply", 0), ("reply", 300), ("forward", 0), ("forward", 300)}
    for kind, ms in kinds:  # independent draws: each a quarter
        n = sum(1 for d in got if (d.kind, d.delay_ms) == (kind, ms))
        assert 850 < n < 1150, (kind, ms, n)
