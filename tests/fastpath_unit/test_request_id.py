"""fastpath.request_id and the reference model's hcm_added (bpf_src/dp_xrid.h's
rule); tests/split/test_request_id_envoy.py holds them to the real Envoy."""

from __future__ import annotations

import uuid

from fastpath.plan import (
    ClusterAction,
    DirectResponse,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, decide_datapath
from fastpath.request_id import (
    UUID4,
    UUID4_PATTERN,
    UUID_EXTENSION,
    added_headers,
    hcm_reasons,
    normalized,
)
from tests.split.harness import listener_plan


def test_added_headers_only_what_is_missing_xfp_first() -> None:
    assert added_headers(()) == (("x-forwarded-proto", "http"), ("x-request-id", UUID4_PATTERN))
    assert added_headers((("X-Request-ID", "a"),)) == (("x-forwarded-proto", "http"),)
    assert added_headers((("x-forwarded-proto", "https"),)) == (("x-request-id", UUID4_PATTERN),)
    assert added_headers((("x-forwarded-proto", ""), ("x-request-id", ""))) == ()


def test_uuid4_pattern() -> None:
    assert all(UUID4.fullmatch(str(uuid.uuid4())) for _ in range(50))
    assert not UUID4.fullmatch(str(uuid.uuid4()).upper())
    assert not UUID4.fullmatch("ddf33b3b-2883-91f9-a9d8-e0a86bfd3502")  # Envoy's, traced (version 9)
    assert normalized("X-Request-Id", str(uuid.uuid4())) == "<uuid4>"
    assert normalized("x-request-id", "client-id-1") == "client-id-1"


def test_hcm_settings_the_kernel_path_does_not_reproduce() -> None:
    assert hcm_reasons({}) == []
    assert hcm_reasons({"useRemoteAddress": False, "generateRequestId": {"value": True},
                        "preserveExternalRequestId": True,
                        "tracing": {}, "requestIdExtension": {"typedConfig": {
                            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3."
                                     "UuidRequestIdConfig", "packTraceReason": False}}}) == []
    assert hcm_reasons({"tracing": {}, "requestIdExtension": {"typedConfig": {
        "@type": UUID_EXTENSION, "useRequestIdForTraceSampling": {"value": False}}}}) == []
    one = [hcm_reasons({"useRemoteAddress": True}), hcm_reasons({"generateRequestId": False}),
           hcm_reasons({"generateRequestId": {"value": False}}),
           hcm_reasons({"alwaysSetRequestIdInResponse": True}),
           hcm_reasons({"requestIdExtension": {"typedConfig": {"@type": "type.googleapis.com/x.Y"}}})]
    assert [len(r) for r in one] == [1] * 5, one
    assert "use_remote_address" in one[0][0] and "x.Y" in one[4][0]
    assert hcm_reasons({"tracing": {}}) == []  # fastpath.tracing's (tests/fastpath_unit/test_tracing.py)


def test_reference_adds_them_on_forwards_only() -> None:
    fwd = Route("f", RouteMatch(PathKind.PREFIX, "/f"), ClusterAction((WeightedCluster("c", 1),)),
                Verdict.KERNEL)
    reply = Route("r", RouteMatch(PathKind.PREFIX, "/r"), DirectResponse(200, "x"), Verdict.KERNEL)
    plan = listener_plan((fwd, reply))
    d = decide_datapath(plan, "l", Request("GET", "/f", "a", (("x-request-id", "mine"),)))
    assert d.kind == "forward" and d.hcm_added == (("x-forwarded-proto", "http"),)
    d = decide_datapath(plan, "l", Request("GET", "/r", "a"))
    assert d.kind == "reply" and d.hcm_added == ()
