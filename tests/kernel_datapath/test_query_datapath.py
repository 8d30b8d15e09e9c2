"""Query-parameter matchers on the real data path: l7fp_decide with
L7FP_F_QUERY in the agent's sk_msg programs. A route matching `great=example`
is forwarded by the kernel, one matching a present `x` is answered by the
kernel, a query the kernel leaves to Envoy ('+') and one no kernel route
matches reach Envoy."""

from __future__ import annotations

import json

import pytest
from k2_plan import load_plan, with_routes
from test_agent import (
    ClusterAction,
    KernelPlan,
    WeightedCluster,
    client_plan,
    run,
)

from fastpath.plan import (
    DirectResponse,
    PathKind,
    QueryParamMatch,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
)

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]


def _plan(envoy_port: int, up_port: int) -> KernelPlan:
    great = QueryParamMatch("great", StringMatch(StringKind.EXACT, "example"))
    routes = (
        Route("great", RouteMatch(PathKind.PREFIX, "/", query_params=(great,)),
              ClusterAction((WeightedCluster("up", 100),)), Verdict.KERNEL),
        Route("x", RouteMatch(PathKind.PREFIX, "/", query_params=(QueryParamMatch("x"),)),
              DirectResponse(403, "no x"), Verdict.KERNEL),
        Route("punt", RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster("up", 100),)),
              Verdict.ENVOY),
    )
    return with_routes(client_plan(envoy_port, up_port), routes)


def test_query_matchers_on_the_data_path(agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    node = load_plan(agent, _plan(envoy.port, upstream.port))
    assert node.mode == "l7fp"
    req = "GET {} HTTP/1.1\r\nHost: svc\r\n\r\n".format
    out = run(cgroup, envoy.port, [[{"send": [req("/a?b=1&great=example")]},
                                    {"send": [req("/a?x&great=exampl")]},
                                    {"send": [req("/a?great=example+")]},
                                    {"send": [req("/a?great=example2")]}]])[0]
    fast, denied, plus, punted = out
    assert fast["status"] == 200 and "x-via" not in fast["headers"], fast
    assert json.loads(fast["body"])["line"] == "GET /a?b=1&great=example HTTP/1.1"
    assert denied["status"] == 403 and denied["body"] == "no x", denied
    assert plus["headers"].get("x-via") == "envoy", plus
    assert punted["headers"].get("x-via") == "envoy", punted
