"""The DFA matchers on the real data path: l7fp_decide with L7FP_F_DFA in the
agent's sk_msg programs (loaded with their bpf_loop callback by
fastpath.bpf_callback, next to the programs they tail-call), a path regex route
forwarded by the kernel, a case-insensitive `contains` on User-Agent answered
by the kernel, a path the regex does not match handed to Envoy."""

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

from fastpath.classify_match import route_match
from fastpath.plan import (
    DirectResponse,
    HeaderMatch,
    PathKind,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
)

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]


def _plan(envoy_port: int, up_port: int) -> KernelPlan:
    ua = HeaderMatch("user-agent", StringMatch(StringKind.CONTAINS, "safari", True))
    rx, reasons = route_match({"safeRegex": {"regex": "/fast/[a-z]+"}})
    assert not reasons and rx.regex_dfa is not None
    routes = (
        Route("ua", RouteMatch(PathKind.PREFIX, "/", headers=(ua,)),
              DirectResponse(403, "no safari"), Verdict.KERNEL),
        Route("rx", rx, ClusterAction((WeightedCluster("up", 100),)), Verdict.KERNEL),
        Route("punt", RouteMatch(PathKind.PREFIX, "/"), ClusterAction((WeightedCluster("up", 100),)),
              Verdict.ENVOY),
    )
    return with_routes(client_plan(envoy_port, up_port), routes)


def test_dfa_matchers_on_the_data_path(agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    node = load_plan(agent, _plan(envoy.port, upstream.port))
    assert node.mode == "l7fp"
    safari = "GET /fast/abc HTTP/1.1\r\nHost: svc\r\nUser-Agent: Mozilla SAFARI/1\r\n\r\n"
    out = run(cgroup, envoy.port, [[{"send": ["GET /fast/abc HTTP/1.1\r\nHost: svc\r\n\r\n"]},
                                    {"send": [safari]},
                                    {"send": ["GET /fast/ab1 HTTP/1.1\r\nHost: svc\r\n\r\n"]}]])[0]
    fast, denied, punted = out
    assert fast["status"] == 200 and "x-via" not in fast["headers"], fast
    assert json.loads(fast["body"])["line"] == "GET /fast/abc HTTP/1.1"
    assert denied["status"] == 403 and denied["body"] == "no safari", denied
    assert punted["headers"].get("x-via") == "envoy", punted
    assert all("Mozilla" not in line for line in upstream.seen)
