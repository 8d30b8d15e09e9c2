"""Verdict honesty: what the kernel can't reproduce is ENVOY, with the reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify_match import regex_shape
from fastpath.classify_route import KernelCaps
from fastpath.plan import Verdict
from fastpath.split import split_snapshot

HCM_T = "type.googleapis.com/" + em.HCM
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def listener(routes: list[dict[str, Any]], filters: list[dict[str, Any]] | None = None,
             **chain: Any) -> dict[str, Any]:
    return {"name": "l", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
            "filter_chains": [{**chain, "filters": [{"name": "hcm", "typed_config": {
                "@type": HCM_T, "stat_prefix": "s", "http_filters": (filters or []) + [ROUTER],
                "route_config": {"name": "rc", "virtual_hosts": [
                    {"name": "vh", "domains": ["*"], "routes": routes}]}}}]}]}


CLUSTER = {"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c", "endpoints": [
    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "198.18.0.9",
                                                                    "port_value": 80}}}}]}]}}


def verdicts(routes: list[dict[str, Any]], cluster: dict[str, Any] = CLUSTER,
             filters: list[dict[str, Any]] | None = None, **chain: Any) -> list[tuple[Verdict, str]]:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener(routes, filters, **chain))],
           em.CLUSTER: [em.parse(em.CLUSTER, cluster)]}
    plan = split_snapshot("n", res).plan
    return [(r.verdict, r.reason) for r in plan.listeners[0].virtual_hosts[0].routes]


def fwd(**extra: Any) -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "route": {"cluster": "c", **extra}}


def test_route_timeouts_are_kernel_with_envoy_default_in_the_plan() -> None:
    """The data path enforces route timeouts (fastpath/timeouts.py): an unset
    timeout is Envoy's 15 s default, 0s is none (Istio)."""
    assert verdicts([fwd()]) == [(Verdict.KERNEL, "")]
    assert verdicts([fwd(timeout="0s")]) == [(Verdict.KERNEL, "")]
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([fwd(), fwd(timeout="0s"),
                                                         fwd(timeout="1.5s")]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    routes = split_snapshot("n", res).plan.listeners[0].virtual_hosts[0].routes
    assert [r.action.timeout_ms for r in routes] == [15000, None, 1500]  # type: ignore[union-attr]


def test_max_stream_duration_turns_the_route_timeout_off() -> None:
    """Envoy's router ignores `timeout` on a route with max_stream_duration
    (usingNewTimeouts; the Istio importer's routes carry {0s, 0s}): seen on a
    real Envoy 1.40, a 1 s timeout never fired. No timer in the plan either."""
    msd = {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([
        fwd(timeout="1s", max_stream_duration=msd), fwd(max_stream_duration=msd)]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    routes = split_snapshot("n", res).plan.listeners[0].virtual_hosts[0].routes
    assert [(r.verdict, r.action.timeout_ms, r.request_headers_to_add)  # type: ignore[union-attr]
            for r in routes] == [(Verdict.KERNEL, None, ())] * 2


def test_without_the_timer_a_timeout_needs_envoy() -> None:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([fwd(), fwd(timeout="0s")]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    plan = split_snapshot("n", res, KernelCaps(route_timeouts=False)).plan
    (v1, why), (v2, _) = [(r.verdict, r.reason) for r in plan.listeners[0].virtual_hosts[0].routes]
    assert v1 is Verdict.ENVOY and "15000ms (Envoy default)" in why
    assert v2 is Verdict.KERNEL


@pytest.mark.parametrize("retry_on,verdict", [
    ("connect-failure", Verdict.KERNEL), ("connect-failure,refused-stream", Verdict.KERNEL),
    ("5xx", Verdict.KERNEL), ("reset", Verdict.KERNEL), ("connect-failure,gateway-error", Verdict.KERNEL),
    ("envoy-ratelimited", Verdict.ENVOY), ("5xx,retriable-headers", Verdict.ENVOY),
])
def test_retry_conditions(retry_on: str, verdict: Verdict) -> None:
    (v, why), = verdicts([fwd(timeout="0s", retry_policy={"retry_on": retry_on, "num_retries": 2})])
    assert v is verdict, why


@pytest.mark.parametrize("extra,needle", [
    ({"request_mirror_policies": [{"cluster": "c"}]}, ""),  # the data path mirrors (dp_mirror.h)
    # cluster_header: KERNEL with guard entries, tests/split/test_mirror_header.py
    ({"request_mirror_policies": [{"cluster": "nope"}]}, "mirror cluster 'nope' not defined"),
    ({"hash_policy": [{"header": {"header_name": "x"}}]}, ""),  # ignored: cluster doesn't hash
    ({"regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"}}, "regex_rewrite 'a' -> 'b': not a whole-path"),
])
def test_route_features(extra: dict[str, Any], needle: str) -> None:
    (v, why), = verdicts([fwd(timeout="0s", **extra)])
    assert (v is Verdict.ENVOY) == bool(needle) and needle in why


def test_response_headers_and_formatters_need_envoy() -> None:
    r1 = {**fwd(timeout="0s"), "response_headers_to_add": [{"header": {"key": "a", "value": "b"}}]}
    r2 = {**fwd(timeout="0s"), "request_headers_to_add": [{"header": {"key": "a", "value": "%REQ(x)%"}}]}
    r3 = {**fwd(timeout="0s"), "request_headers_to_add": [{"header": {"key": "a", "value": "b"}}]}
    (v1, w1), (v2, w2), (v3, _) = verdicts([r1, r2, r3])
    assert v1 is Verdict.ENVOY and "response headers" in w1
    assert v2 is Verdict.ENVOY and "formatter" in w2
    assert v3 is Verdict.KERNEL


@pytest.mark.parametrize("kind", ["lua.v3.Lua", "ext_authz.v3.ExtAuthz", "jwt_authn.v3.JwtAuthentication"])
def test_filters_that_need_envoy(kind: str) -> None:
    f = {"name": "f", "typed_config": {"@type": f"type.googleapis.com/envoy.extensions.filters.http.{kind}"}}
    (v, why), = verdicts([fwd(timeout="0s")], filters=[f])
    assert v is Verdict.ENVOY and "http filter" in why


def test_upstream_tls_and_downstream_tls() -> None:
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}}
    (v, why), = verdicts([fwd(timeout="0s")], cluster={**CLUSTER, "transport_socket": tls})
    assert v is Verdict.ENVOY and "upstream TLS" in why
    dtls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"}}
    (v, why), = verdicts([fwd(timeout="0s")], transport_socket=dtls)
    assert v is Verdict.ENVOY and "downstream TLS" in why


def test_true_regex_is_punt_entry_and_keeps_order() -> None:
    """The kernel cannot evaluate the first route's regex: its punt entry catches
    every request, so the later route never runs in the kernel and is ENVOY
    (synth_tables TableBuilder._shadowed); after a punt that keeps its own
    matcher, later routes stay KERNEL."""
    routes = [{"match": {"safe_regex": {"regex": "/(a|b)*a(a|b){7}"}}, "route": {"cluster": "c", "timeout": "0s"}},
              {"match": {"safe_regex": {"regex": "^/x/.*"}}, "route": {"cluster": "c", "timeout": "0s"}}]
    (v1, w1), (v2, w2) = verdicts(routes)
    assert v1 is Verdict.ENVOY and "no small DFA (more than 64 DFA states)" in w1
    assert v2 is Verdict.ENVOY and w2 == ("kernel decision: after route '', whose kernel punt "
                                          "catches every request")
    kept = [{"match": {"prefix": "/h"}, "route": {"cluster": "c", "timeout": "0s",
                                                  "host_rewrite_header": "x-h"}},
            {"match": {"safe_regex": {"regex": "^/x/.*"}}, "route": {"cluster": "c", "timeout": "0s"}}]
    assert [v for v, _ in verdicts(kept)] == [Verdict.ENVOY, Verdict.KERNEL]
    kept[0]["match"] = {"prefix": ""}  # evaluable, but it matches every request
    assert verdicts(kept)[1] == (Verdict.ENVOY, "kernel decision: after route '', whose kernel "
                                 "punt catches every request")
    # a bounded DFA: the kernel decision walks it (bpf_src/include/l7fp_dfa.h)
    (v3, w3), = verdicts([{"match": {"safe_regex": {"regex": "/users/[0-9]+"}},
                           "route": {"cluster": "c", "timeout": "0s"}}])
    assert v3 is Verdict.KERNEL, w3


def test_routes_the_kernel_decision_punts_are_envoy_and_keep_their_limiter() -> None:
    """What the plan can express but the synthesized decision punts (a `contains`
    query-parameter matcher) is ENVOY in the split, and the residual leaves such a route's
    local rate limit with Envoy (before, the limiter was removed and nobody enforced it).
    A redirect is KERNEL (bpf_src/dp_redir.h: the agent builds its Location)."""
    lrl = {"envoy.filters.http.local_ratelimit": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "r", "token_bucket": {"max_tokens": 1, "fill_interval": "60s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}}}}
    routes = [{"match": {"prefix": "/q", "query_parameters": [
                   {"name": "a", "string_match": {"contains": "x"}}]},
               "route": {"cluster": "c", "timeout": "0s"}, "typed_per_filter_config": lrl},
              {"match": {"prefix": "/r"}, "redirect": {"https_redirect": True}},
              {"match": {"prefix": "/"}, "route": {"cluster": "c", "timeout": "0s"},
               "typed_per_filter_config": lrl}]
    filters = [{"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "l"}}]
    res = {em.LISTENER: [em.parse(em.LISTENER, listener(routes, filters))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    out = split_snapshot("n", res)
    got = [(r.verdict, r.reason) for r in out.plan.listeners[0].virtual_hosts[0].routes]
    # /q's punt entry keeps its path (the kernel cannot evaluate the query
    # matcher: synth_punt): /r never meets it and stays KERNEL; a request to
    # /q/x?a=y reaches Envoy, which routes it to /: Envoy keeps /'s limiter
    shared = ("kernel decision: rate limit after route '', whose kernel punt may hand Envoy "
              "requests of this route")
    assert got == [(Verdict.ENVOY, "kernel decision: query parameter matcher kind contains"),
                   (Verdict.KERNEL, ""), (Verdict.ENVOY, shared)]
    kept = em.to_json(out.residual[em.LISTENER][0])
    rc = kept["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]
    limiter = [json.dumps(r.get("typedPerFilterConfig", {})) for r in rc["virtualHosts"][0]["routes"]]
    # Envoy keeps both limiters (before, /'s was disabled for Envoy and the
    # kernel, punting every request at /q's entry, enforced it for nobody;
    # now the kernel decides /q/x?a=y, whose Envoy route is /, at /q's punt)
    assert "tokenBucket" in limiter[0] and "tokenBucket" in limiter[2]


@pytest.mark.parametrize("pattern,shape", [
    (r"/a\.b", ("literal", "/a.b")), (r"^/a/.*$", ("prefix", "/a/")), ("/a+", None),
    (r".*Safari.*", ("contains", "Safari")), (r".*\.json", ("suffix", ".json")),
    ("/(a|b)", None), ("(?i)/a", None), ("/a.", None),
])
def test_regex_shape(pattern: str, shape: tuple[str, str] | None) -> None:
    assert regex_shape(pattern) == shape


def test_rbac_kernel_and_envoy() -> None:
    def rbac(policy: dict[str, Any]) -> dict[str, Any]:
        return {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"p": policy}}}}
    ok = {"permissions": [{"and_rules": {"rules": [{"url_path": {"path": {"prefix": "/admin"}}},
                                                   {"header": {"name": ":method", "string_match": {"exact": "POST"}}}]}}],
          "principals": [{"direct_remote_ip": {"address_prefix": "198.18.0.0", "prefix_len": 15}}]}
    assert verdicts([fwd(timeout="0s")], filters=[rbac(ok)])[0][0] is Verdict.KERNEL
    mtls = {"permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://x"}}}]}
    v, why = verdicts([fwd(timeout="0s")], filters=[rbac(mtls)])[0]
    assert v is Verdict.ENVOY and "mTLS" in why


def _vhost_plan(vh_extra: dict[str, Any], hcm_extra: dict[str, Any] | None = None) -> Any:
    lis = listener([fwd(timeout="0s")])
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0].update(vh_extra)
    hcm.update(hcm_extra or {})
    res = {em.LISTENER: [em.parse(em.LISTENER, lis)], em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    return split_snapshot("n", res).plan.listeners[0].virtual_hosts[0].routes[0]


def test_attempt_count_header_is_a_kernel_header_add() -> None:
    r = _vhost_plan({"include_request_attempt_count": True})
    assert r.verdict is Verdict.KERNEL
    assert [(h.name, h.value) for h in r.request_headers_to_add] == [("x-envoy-attempt-count", "1")]
    r = _vhost_plan({"include_attempt_count_in_response": True})
    assert r.verdict is Verdict.ENVOY and "response" in r.reason


@pytest.mark.parametrize("vh,hcm,needle", [
    ({"hedge_policy": {"hedge_on_per_try_timeout": True}}, None, "virtual host hedgePolicy"),
    ({"request_mirror_policies": [{"cluster": "c"}]}, None, "requestMirrorPolicies"),
    ({}, {"local_reply_config": {"mappers": []}}, None),  # empty: no effect
    ({}, {"via": "l7fp"}, "http_connection_manager via"),
    ({}, {"strip_any_host_port": True}, "stripAnyHostPort"),
    # any HCM field not known to be harmless: Envoy's
    ({}, {"path_normalization_options": {"forwarding_transformation": {"operations": [
        {"normalize_path_rfc_3986": {}}]}}}, "http_connection_manager field pathNormalizationOptions"),
    ({}, {"http_protocol_options": {"ignore_http_11_upgrade": [{"exact": "h2c"}]}},
     "http_protocol_options field ignoreHttp11Upgrade"),
    ({}, {"stream_idle_timeout": "10s", "request_timeout": "5s", "drain_timeout": "1s", "xff_num_trusted_hops": 1,
          "server_name": "x", "http_protocol_options": {"accept_http_10": True},
          "common_http_protocol_options": {"idle_timeout": "60s", "max_requests_per_connection": 9}}, None),
])
def test_unknown_or_behavioural_fields_need_envoy(vh: dict[str, Any], hcm: dict[str, Any] | None,
                                                  needle: str | None) -> None:
    r = _vhost_plan(vh, hcm)
    if needle is None:
        assert r.verdict is Verdict.KERNEL, r.reason
    else:
        assert r.verdict is Verdict.ENVOY and needle in r.reason, r.reason


def test_ext_authz_disabled_per_route_is_kernel() -> None:
    f = {"name": "authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"}}
    off = {"authz": {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                     "disabled": True}}
    (v1, _), (v2, why) = verdicts([{**fwd(timeout="0s"), "match": {"prefix": "/public"},
                                    "typed_per_filter_config": off}, fwd(timeout="0s")], filters=[f])
    assert v1 is Verdict.KERNEL and v2 is Verdict.ENVOY and "ext_authz" in why


def test_split_hook_contract() -> None:
    """Residual keeps every resource (same objects when nothing is kernel-owned); plans repeat."""
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([fwd(timeout="0s")]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    a, b = split_snapshot("n", res), split_snapshot("n", res)
    assert a.plan == b.plan and a.plan.version and a.plan.node_id == "n"
    assert set(a.residual) == set(res)
    assert all(x is y for url in res for x, y in zip(a.residual[url], res[url], strict=True))
    other = {**res, em.CLUSTER: [em.parse(em.CLUSTER, {**CLUSTER, "lb_policy": "RANDOM"})]}
    assert split_snapshot("n", other).plan.version != a.plan.version


@pytest.mark.parametrize("fcm,needle", [
    ({"destination_port": 8080}, None),
    ({"server_names": ["a.example"]}, "filter_chain_match on serverNames"),
    ({"source_prefix_ranges": [{"address_prefix": "198.18.0.0", "prefix_len": 15}]}, "sourcePrefixRanges"),
    ({"transport_protocol": "tls"}, "transport tls"),
])
def test_filter_chain_match(fcm: dict[str, Any], needle: str | None) -> None:
    (v, why), = verdicts([fwd(timeout="0s")], filter_chain_match=fcm)
    assert (v is Verdict.KERNEL) if needle is None else (v is Verdict.ENVOY and needle in why), why


def test_listener_for() -> None:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([fwd(timeout="0s")]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    plan = split_snapshot("n", res).plan
    assert plan.listener_for("198.18.0.5", 8080) is plan.listeners[0]
    assert plan.listener_for("198.18.0.5", 9090) is None


@pytest.mark.parametrize("extra,needle", [
    ({"lb_subset_config": {"fallback_policy": "ANY_ENDPOINT"}}, "cluster field lbSubsetConfig"),
    ({"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": "rh", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash"}}}]}},
     "load_balancing_policy"),
    ({"common_lb_config": {"healthy_panic_threshold": {"value": 0}}}, "panic"),
    ({"dns_lookup_family": "V4_ONLY", "connect_timeout": "1s"}, None),
    ({"round_robin_lb_config": {"slow_start_config": {"slow_start_window": "30s"}}}, "slow start"),
    ({"round_robin_lb_config": {"slow_start_config": {}}}, None),  # no window: no slow start
    ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {
        "slow_start_config": {"slow_start_window": "10s"}}}, "slow start"),
    ({"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": "rr", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
        "slow_start_config": {"slow_start_window": "5s"}}}}]}}, "slow start"),
])
def test_cluster_fields(extra: dict[str, Any], needle: str | None) -> None:
    (v, why), = verdicts([fwd(timeout="0s")], cluster={**CLUSTER, **extra})
    assert (v is Verdict.KERNEL) if needle is None else (v is Verdict.ENVOY and needle in why), why


def _endpoints(n: int) -> dict[str, Any]:
    return {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": f"198.18.0.{9 + i}", "port_value": 80}}}}
        for i in range(n)]}]}


def _typed_lb(name: str, msg: str) -> dict[str, Any]:
    return {"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": name, "typed_config": {
        "@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{name}.v3.{msg}"}}}]}}


_LR = {"lb_policy": "LEAST_REQUEST"}


@pytest.mark.parametrize("lb,n,needle", [
    (_LR, 1, None),  # one endpoint: no choice to make
    (_LR, 2, None),  # the kernel's pick: two draws, fewer in flight
    (_LR, 3, None),
    (_LR, 64, None),
    (_LR, 65, "more than 64 endpoints"),  # the kernel's counters per cluster
    ({"lb_policy": "RANDOM"}, 2, None),
    ({"lb_policy": "ROUND_ROBIN"}, 2, None),
    # a typed policy is the one Envoy uses, whatever lb_policy says
    (_typed_lb("least_request", "LeastRequest"), 2, None),
    ({"lb_policy": "RANDOM", **_typed_lb("least_request", "LeastRequest")}, 2, None),
    ({"lb_policy": "LEAST_REQUEST", **_typed_lb("random", "Random")}, 2, None),
    (_typed_lb("round_robin", "RoundRobin"), 2, None),
    # what the kernel's two draws are not
    ({**_LR, "least_request_lb_config": {"choice_count": 3}}, 2, "choice_count 3"),
    ({**_LR, "least_request_lb_config": {"choice_count": 2}}, 2, None),
    ({"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": "lr", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3."
                 "LeastRequest", "choice_count": 4}}}]}}, 2, "choice_count 4"),
    ({"load_balancing_policy": {"policies": [{"typed_extension_config": {"name": "lr", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3."
                 "LeastRequest", "selection_method": "FULL_SCAN"}}}]}}, 2, "full scan"),
    ({**_LR, "outlier_detection": {"consecutive_gateway_failure": 5}}, 2, "outlier detection"),
])
def test_least_request_verdicts(lb: dict[str, Any], n: int, needle: str | None) -> None:
    """Envoy's LEAST_REQUEST with equal weights is power of two choices over its
    active requests (tests/split/test_least_request_envoy.py); the kernel makes
    the same pick over its requests in flight (l7fp_decide.h l7fp_pick_lr), so
    such a cluster is KERNEL; a configuration whose pick is another is ENVOY."""
    cluster = {**CLUSTER, **lb, "load_assignment": _endpoints(n)}
    (v, why), = verdicts([fwd(timeout="0s")], cluster=cluster)
    if needle is None:
        assert v is Verdict.KERNEL, why
    else:
        assert v is Verdict.ENVOY and needle in why, why


def test_classifier_error_is_an_envoy_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastpath.classify as cl

    def boom(*_a: Any, **_k: Any) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(cl, "_vhosts", boom)
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([fwd(timeout="0s")]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER)]}
    lp, = split_snapshot("n", res).plan.listeners
    assert (lp.name, lp.port, lp.verdict) == ("l", 8080, Verdict.ENVOY) and "surprise" in lp.reason
