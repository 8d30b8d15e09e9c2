"""fastpath.tracing: Envoy's sampling numerator per HCM, the reasons that keep
a tracing listener or route with Envoy, the digit per id, and the reference
model's trace_header punt (bpf_src/dp_xrid.h's DP_R_TRACE). What Envoy does:
tests/split/test_tracing_envoy.py."""

from __future__ import annotations

import re
from dataclasses import replace

from fastpath.plan import ClusterAction, PathKind, Route, RouteMatch, Verdict, WeightedCluster
from fastpath.reference import Request, decide_datapath
from fastpath.tracing import (
    TRACE_HEADERS,
    ZIPKIN_TYPE,
    b3_lines,
    decorator_operation,
    hcm_reasons,
    inbound_sampling,
    overall,
    provider,
    provider_reasons,
    route_reasons,
    sampling,
    traced_id_pattern,
    version_digit,
    zipkin_forwards,
)
from tests.split.harness import listener_plan

UUID_T = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"


def test_sampling_numerator_as_envoy_converts_percent() -> None:
    assert sampling({}) is None
    assert sampling({"tracing": {}}) == 10000
    assert sampling({"tracing": {"randomSampling": {"value": 30}}}) == 3000
    assert sampling({"tracing": {"randomSampling": {"value": 60.0},
                                 "overallSampling": {"value": 30.0}}}) == 3000
    assert sampling({"tracing": {"randomSampling": {}}}) == 0  # Percent 0 as protojson gives it
    assert sampling({"tracing": {"randomSampling": {"value": 0.57}}}) == 56  # truncated, as Envoy's
    for flag in ("packTraceReason", "useRequestIdForTraceSampling"):  # the digit then stays 4
        assert sampling({"tracing": {}, "requestIdExtension": {"typedConfig": {
            "@type": UUID_T, flag: False}}}) == 0


def test_reasons() -> None:
    assert hcm_reasons({}, runtime="layered_runtime rtds") == []
    assert hcm_reasons({"tracing": {}}) == []  # INBOUND too: inbound_merge.trace_refusal
    zipkin = {"@type": ZIPKIN_TYPE, "collectorCluster": "c", "collectorEndpointVersion": "HTTP_JSON"}
    assert hcm_reasons({"tracing": {"provider": {"name": "z", "typedConfig": zipkin}}}) == []
    assert provider({"tracing": {"provider": {"name": "z", "typedConfig": zipkin}}}) == "zipkin"
    assert provider_reasons({"name": "z", "typedConfig": {**zipkin, "sharedSpanContext": {"value": True},
                                                          "traceId128bit": False}}) == []
    assert "sharedSpanContext" in provider_reasons({"name": "z", "typedConfig": {
        **zipkin, "sharedSpanContext": {"value": False}}})[0]
    assert "traceId128bit" in provider_reasons({"name": "z", "typedConfig": {**zipkin, "traceId128bit": True}})[0]
    other = {"tracing": {"provider": {"name": "envoy.tracers.opentelemetry", "typedConfig": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"}}}}
    assert "envoy.tracers.opentelemetry" in hcm_reasons(other)[0] and provider(other) == ""
    assert "runtime" in hcm_reasons({"tracing": {}}, runtime="layered_runtime disk")[0]
    assert route_reasons({"match": {"prefix": "/"}}, egress=False) == []
    assert len(route_reasons({"decorator": {"operation": "op"}, "tracing": {"randomSampling": {}},
                              "route": {"requestMirrorPolicies": [{"cluster": "c"}]}}, egress=False)) == 3
    assert route_reasons({"decorator": {"operation": "op"}}, egress=True) == []  # a header add
    # INBOUND: its response header is removed by the OUTBOUND tracing caller inbound_merge requires
    assert route_reasons({"decorator": {"operation": "op"}}, egress=False, inbound=True) == []
    assert route_reasons({"decorator": {"operation": "op", "propagate": False}}, egress=False) == []
    assert decorator_operation({"decorator": {"operation": "op"}}) == "op"
    assert decorator_operation({"decorator": {"operation": "op", "propagate": {"value": False}}}) == ""


def test_version_digit_per_id() -> None:
    assert version_digit("00000bb7-0000-4000-8000-000000000000", 3000) == "9"  # r = 2999
    assert version_digit("00000bb8-0000-4000-8000-000000000000", 3000) == "4"  # r = 3000
    assert version_digit("ffffffff-0000-4000-8000-000000000000", 7296) == "9"  # r = 7295
    assert version_digit("00000000-0000-4000-8000-000000000000", 0) == "4"
    assert version_digit("00000000-0000-4000-8000-000000000000", None) == "4"
    assert re.fullmatch(traced_id_pattern(3000), "00000000-0000-9000-8000-000000000000")
    assert not re.fullmatch(traced_id_pattern(None), "00000000-0000-9000-8000-000000000000")


def test_reference_hands_trace_headers_to_envoy() -> None:
    fwd = Route("f", RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster("c", 1),)),
                Verdict.KERNEL)
    plan = listener_plan((fwd,))
    plan = replace(plan, listeners=(replace(plan.listeners[0], trace_sampling=3000),))
    d = decide_datapath(plan, "l", Request("GET", "/f", "a"))
    assert d.kind == "forward" and d.hcm_added == (("x-forwarded-proto", "http"),
                                                   ("x-request-id", traced_id_pattern(3000)))
    for name in TRACE_HEADERS:
        d = decide_datapath(plan, "l", Request("GET", "/f", "a", ((name.upper(), "1"),)))
        assert (d.kind, d.reason) == ("envoy", "trace_header"), name
    d = decide_datapath(plan, "l", Request("GET", "/f", "a", (("x-b3-traceid", "1"),)))
    assert d.kind == "forward" and d.trace_added == ()  # no provider: b3 headers pass as sent
    plan = replace(plan, listeners=(replace(plan.listeners[0], trace_provider="zipkin"),))
    for name in ("X-B3-TraceId", "x-b3-flags", "b3", "traceparent", "tracestate"):
        d = decide_datapath(plan, "l", Request("GET", "/f", "a", ((name, "1"),)))
        assert (d.kind, d.reason) == ("envoy", "trace_header"), name
    d = decide_datapath(plan, "l", Request("GET", "/f", "a", (("x-b3", "1"), ("b33", "1"))))
    assert d.kind == "forward" and d.trace_added == b3_lines()
    assert zipkin_forwards("00000bb8-0000-4000-8000-000000000000", 3000)  # r = 3000: not sampled
    assert not zipkin_forwards("00000bb7-0000-9000-8000-000000000000", 3000)


def test_what_arrives_sampled_behind_an_inbound_listener() -> None:
    assert overall({}) == 10000 and overall({"tracing": {"overallSampling": {"value": 20}}}) == 2000
    assert overall({"tracing": {"overallSampling": {"value": 20}}, "requestIdExtension": {
        "typedConfig": {"@type": UUID_T, "packTraceReason": False}}}) == 10000  # never unmarks
    assert inbound_sampling(3000, 3000, 10000) == 3000  # the same: kept
    assert inbound_sampling(3000, 2000, 10000) == 3000  # a smaller random_sampling: kept
    assert inbound_sampling(3000, 6000, 10000) == 6000  # a larger one samples more ids
    assert inbound_sampling(3000, 2000, 2000) == 2000  # overall_sampling unmarks r >= 2000
    assert inbound_sampling(None, 3000, 10000) == 3000  # a caller without tracing: all its own
    assert inbound_sampling(10000, 100, 10000) == 10000  # Envoy's default 100 % before 1 %
