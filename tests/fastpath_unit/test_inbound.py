"""When may the fast path skip a destination's inbound sidecar (rule 4)?"""

from __future__ import annotations

import dataclasses

import pytest

from fastpath.inbound import inbound_transparent
from fastpath.plan import (
    ClusterAction,
    Direction,
    DirectResponse,
    FaultAbort,
    HeaderMatch,
    HeaderValue,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    Rbac,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)

APP = ClusterAction((WeightedCluster("inbound|9000||", 1),))
CATCH_ALL = Route("default", RouteMatch(PathKind.PREFIX, "/"), APP, Verdict.KERNEL)


def listener(*routes: Route, port: int = 9000, **kw: object) -> ListenerPlan:
    vh = VirtualHost("inbound|http|9000", ("*",), routes or (CATCH_ALL,))
    return ListenerPlan("virtualInbound", "0.0.0.0", port, Direction.INBOUND, (vh,), **kw)  # type: ignore[arg-type]


def test_plain_forward_to_the_app_is_transparent() -> None:
    assert inbound_transparent((listener(),), 9000)


def test_a_port_without_inbound_listener_is_passed_through() -> None:
    assert inbound_transparent((listener(port=8080, rbac=Rbac("DENY", ())),), 9000)
    assert inbound_transparent((), 9000)


@pytest.mark.parametrize("policy", [
    {"rbac": Rbac("DENY", ())},
    {"local_rate_limit": LocalRateLimit(1, 1, 1000)},
    {"fault_abort": FaultAbort(503, 1_000_000)},
    {"verdict": Verdict.ENVOY, "reason": "lua"},
], ids=["rbac", "rate-limit", "fault", "envoy-listener"])
def test_listener_policy_keeps_the_destination_on_envoy(policy: dict[str, object]) -> None:
    assert not inbound_transparent((listener(**policy),), 9000)


@pytest.mark.parametrize("change", [
    {"fault_abort": FaultAbort(500, 1_000_000)},
    {"rate_limit": LocalRateLimit(1, 1, 1000)},
    {"request_headers_to_add": (HeaderValue("x-a", "1"),)},
    {"action": DirectResponse(200, "hi")},
    {"action": dataclasses.replace(APP, prefix_rewrite="/v2")},
    {"verdict": Verdict.ENVOY, "reason": "retry on 5xx"},
], ids=["fault", "rate-limit", "header-add", "direct-response", "rewrite", "envoy-route"])
def test_route_that_changes_the_request_keeps_the_destination_on_envoy(change: dict[str, object]) -> None:
    special = dataclasses.replace(
        Route("admin", RouteMatch(PathKind.PREFIX, "/admin"), APP, Verdict.KERNEL), **change)
    assert not inbound_transparent((listener(special, CATCH_ALL),), 9000)


def test_without_a_catch_all_some_request_would_get_envoys_404() -> None:
    only_api = Route("api", RouteMatch(PathKind.PREFIX, "/api"), APP, Verdict.KERNEL)
    header = Route("h", RouteMatch(PathKind.PREFIX, "/", headers=(HeaderMatch("x-a"),)), APP,
                   Verdict.KERNEL)
    assert not inbound_transparent((listener(only_api),), 9000)
    assert not inbound_transparent((listener(header),), 9000)
    assert inbound_transparent((listener(only_api, CATCH_ALL),), 9000)
