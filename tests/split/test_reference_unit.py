"""Reference-model edge cases on hand-built plans (no Envoy needed)."""

from __future__ import annotations

from fastpath.plan import (
    ClusterAction,
    HeaderValue,
    KernelPlan,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, decide
from tests.split.harness import listener_plan


def _plan(vh_adds: tuple[HeaderValue, ...] = ()) -> KernelPlan:
    route = Route("r", RouteMatch(PathKind.PREFIX, "/"),
                  ClusterAction((WeightedCluster("c", 1),)), Verdict.KERNEL,
                  request_headers_to_add=(HeaderValue("x-route", "1"),))
    return listener_plan((route,), vh_adds=vh_adds)


def test_listener_without_rbac_under_default_filter_order_forwards() -> None:
    # The default filter_order names an "rbac" slot; a listener with no RBAC
    # filter must simply have nothing to enforce there (was StopIteration).
    d = decide(_plan(), "l", Request("GET", "/x", "a"))
    assert d.kind == "forward" and d.cluster == "c"


def test_virtual_host_header_adds_follow_the_route_adds() -> None:
    d = decide(_plan((HeaderValue("x-vh", "2"),)), "l", Request("GET", "/", "a"))
    assert d.add_headers == (("x-route", "1"), ("x-vh", "2"))


def test_methods_the_kernel_parser_refuses_go_to_envoy() -> None:
    # l7fp_http.h takes only 'A'..'Z', at most 8 bytes (L7FP_R_METHOD otherwise);
    # Envoy 1.40 answers "post" 400 itself (found by test_corpus_differential)
    for method in ("post", "Get", "M-SEARCH", "l7fp-other", "ABCDEFGHI"):
        d = decide(_plan(), "l", Request(method, "/", "a"))
        assert d.kind == "envoy" and "method" in d.reason, (method, d)
    assert decide(_plan(), "l", Request("PROPFIND", "/", "a")).kind == "forward"
