"""Reference-model edge cases on hand-built plans (no Envoy needed)."""

from __future__ import annotations

import random
from collections import Counter

from fastpath.plan import (
    Cluster,
    ClusterAction,
    Endpoint,
    HeaderValue,
    KernelPlan,
    LbPolicy,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, State, decide, least_request_pick
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


def _lr_plan(n: int) -> KernelPlan:
    route = Route("r", RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster("c", 1),)),
                  Verdict.KERNEL)
    eps = tuple(Endpoint(f"198.18.0.{10 + i}", 80) for i in range(n))
    return listener_plan((route,), (Cluster("c", LbPolicy.LEAST_REQUEST, eps),))


def test_least_request_picks_the_draw_with_fewer_in_flight() -> None:
    """Two draws, the endpoint with fewer requests in flight (State.in_flight,
    the kernel's counts), a tie to the first: over many picks with endpoint 0
    busy, it gets the share both draws land on it (1/4 of two), and with
    nothing in flight the pick is even."""
    plan = _lr_plan(2)
    rng = random.Random(3)
    busy = State(in_flight={("c", 0): 3, ("c", 1): 1})
    picks = Counter(decide(plan, "l", Request("GET", "/", "a"), rng, busy).endpoint
                    for _ in range(4000))
    assert 0.22 <= picks[plan.clusters[0].endpoints[0]] / 4000 <= 0.28, picks
    idle = Counter(decide(plan, "l", Request("GET", "/", "a"), rng, State()).endpoint
                   for _ in range(4000))
    assert 0.45 <= idle[plan.clusters[0].endpoints[0]] / 4000 <= 0.55, idle


def test_least_request_pick_ties_and_draws() -> None:
    class Fixed(random.Random):
        def __init__(self, *draws: int) -> None:
            super().__init__(0)
            self.draws = list(draws)

        def randrange(self, n: int) -> int:  # type: ignore[override]
            return self.draws.pop(0)

    counts = {0: 2, 1: 2, 2: 0}
    assert least_request_pick(3, Fixed(0, 1), counts.__getitem__) == 0  # tie: the first draw
    assert least_request_pick(3, Fixed(0, 2), counts.__getitem__) == 2  # fewer in flight
    assert least_request_pick(3, Fixed(2, 0), counts.__getitem__) == 2
    assert least_request_pick(3, Fixed(1, 1), counts.__getitem__) == 1  # the same one twice
