"""The agent on loopback (K2, step 2): a KernelPlan in, the kernel serving it,
pools refilled after clients close, counters, access log, clean detach."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from k2_helpers import client_cmd

from fastpath import bpfsys
from fastpath.agent import Agent
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Direction,
    DirectResponse,
    Endpoint,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]


def route(name: str, prefix: str, action, verdict=Verdict.KERNEL) -> Route:  # type: ignore[no-untyped-def]
    return Route(name=name, match=RouteMatch(PathKind.PREFIX, prefix), action=action,
                 verdict=verdict)


def client_plan(envoy_port: int, up_port: int, version: str = "v1") -> KernelPlan:
    vh = VirtualHost("all", ("*",), (
        route("fast", "/fast", ClusterAction((WeightedCluster("up", 100),))),
        route("deny", "/deny", DirectResponse(403, "RBAC: access denied")),
        route("punt", "/punt", ClusterAction((WeightedCluster("up", 100),)), Verdict.ENVOY),
    ))
    lst = ListenerPlan("out", "127.0.0.1", envoy_port, Direction.OUTBOUND, (vh,))
    cl = Cluster("up", LbPolicy.ROUND_ROBIN, (Endpoint("127.0.0.1", up_port),))
    return KernelPlan("client", version, (lst,), (cl,))


def write_state(path: Path, cgroup: str) -> None:
    path.write_text(json.dumps({"name": "k2test", "pods": [
        {"name": "client-0", "node_id": "client", "cgroup": cgroup, "netns": None,
         "ip": "198.18.250.1", "ports": []},
        {"name": "up-0", "node_id": "up", "cgroup": cgroup + "-none", "netns": None,
         "ip": "127.0.0.1", "ports": []}], "services": []}))


def wait_for(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# A plan's apply is a BCC compile (clang) plus the node's start: on a 2-core
# machine at load 8 it took 7.7-11.5 s (the compile 3-7.7 s of it), and 20 s ran
# out three times at load 9-13 (test_churn, this module). Envoy serves meanwhile.
APPLY_S = 60.0


def wait_applied(agent: Agent, version: str | None = None) -> None:
    """Until node "client" of `agent` runs a plan (of `version`, when given)."""
    def applied() -> bool:
        node = agent.nodes.get("client")
        return node is not None and node.plan is not None and \
            version in (None, node.plan.version)
    wait_for(applied, APPLY_S)


@pytest.fixture(params=["inline", "l7fp"])
def agent(request, kernel, cgroup, tmp_path):  # type: ignore[no-untyped-def]
    """The agent with the built-in decision, and with K1's l7fp_decide."""
    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    a = Agent(state, decide=request.param)
    a.start()
    yield a
    a.stop()


def get(path: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n"


def run(cgroup, port, script):  # type: ignore[no-untyped-def]
    r = cgroup.run(client_cmd("127.0.0.1", str(port), json.dumps(script)))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_agent_applies_plan_and_recycles(agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    agent.on_plan("up", KernelPlan("up", "u1"))
    agent.on_plan("client", client_plan(envoy.port, upstream.port))
    wait_applied(agent)
    node = agent.nodes["client"]
    wait_for(lambda: any(p["free"] >= 2 for p in node.pools.snapshot()))
    out = []
    for _ in range(5):  # one client process each: the agent refills in between
        out += run(cgroup, envoy.port, [[{"send": [get("/fast/a")]}, {"send": [get("/deny")]}]])
    out += run(cgroup, envoy.port, [[{"send": [get("/punt/z")]}]])
    for c in out[:5]:
        assert c[0]["status"] == 200 and "x-via" not in c[0]["headers"]
        assert c[1]["status"] == 403 and c[1]["body"] == "RBAC: access denied"
    assert out[5][0]["headers"].get("x-via") == "envoy"
    assert all("/deny" not in line for line in upstream.seen)
    assert node.mode == agent.decide
    raw = dict(agent.stats())["client"]
    # route names: "fast" (built-in) or "listener/vhost/route" (l7fp_decide)
    stats = {(r.rsplit("/", 1)[-1], o, w): n for (r, o, w), n in raw.items()}
    assert stats[("fast", "fast", "")] == 5
    assert stats[("deny", "kernel_reply", "")] == 5
    assert stats[("punt", "envoy", "punt_route")] == 1
    # every client closed: its upstream sockets are released, pools back at rest
    wait_for(lambda: node.bound() == set())
    wait_for(lambda: all(p["bound"] == 0 for p in node.pools.snapshot()))
    log = node.debug()["access_log"]
    assert any(e["route_name"].endswith("deny") and e["response_code"] == 403 for e in log)
    assert any(e["upstream_cluster"] == "up" for e in log)


def test_plan_swap_and_stop_detaches(agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    agent.on_plan("up", KernelPlan("up", "u1"))
    agent.on_plan("client", client_plan(envoy.port, upstream.port))
    wait_applied(agent)
    node = agent.nodes["client"]
    # v2: /fast becomes a kernel reply
    vh = VirtualHost("all", ("*",), (route("fast", "/fast", DirectResponse(200, "v2")),))
    v2 = KernelPlan("client", "v2", (ListenerPlan("out", "127.0.0.1", envoy.port,
                                                  Direction.OUTBOUND, (vh,)),))
    agent.on_plan("client", v2)
    wait_applied(agent, "v2")
    out = run(cgroup, envoy.port, [[{"send": [get("/fast/x")]}]])
    assert out[0][0]["body"] == "v2"
    prog = bpfsys.prog_id(node.dp.fds["sockops"])
    assert prog in bpfsys.attached_prog_ids(str(cgroup.path))
    agent.stop()
    assert bpfsys.attached_prog_ids(str(cgroup.path)) == []
    out = run(cgroup, envoy.port, [[{"send": [get("/fast/x")]}]])
    assert out[0][0]["headers"].get("x-via") == "envoy"


def test_request_headers_added_in_kernel(kernel, cgroup, envoy, upstream, tmp_path):  # type: ignore[no-untyped-def]
    """l7fp_decide's header-add: the data path inserts the headers before the blank
    line, the upstream sees them, the request still goes the fast way."""
    from dataclasses import replace

    from fastpath.plan import HeaderValue

    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    a = Agent(state, decide="l7fp")
    a.start()
    try:
        plan = client_plan(envoy.port, upstream.port)
        lst = plan.listeners[0]
        vh = lst.virtual_hosts[0]
        r0 = replace(vh.routes[0], request_headers_to_add=(
            HeaderValue("x-l7fp-added", "kernel", append=False),))
        plan = replace(plan, listeners=(replace(lst, virtual_hosts=(
            replace(vh, routes=(r0, *vh.routes[1:])),)),))
        a.on_plan("up", KernelPlan("up", "u1"))
        a.on_plan("client", plan)
        wait_applied(a)
        node = a.nodes["client"]
        assert node.mode == "l7fp"
        wait_for(lambda: any(p["free"] for p in node.pools.snapshot()))
        body = "POST /fast/b HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nabcd"
        out = run(cgroup, envoy.port, [[{"send": [get("/fast/a")]}, {"send": [body]},
                                        {"send": [get("/fast/c")]}]])[0]
        for res, line, n in zip(out, ("GET /fast/a", "POST /fast/b", "GET /fast/c"),
                                (0, 4, 0), strict=True):
            seen = json.loads(res["body"])
            assert res["status"] == 200 and "x-via" not in res["headers"], res
            assert seen["line"] == line + " HTTP/1.1" and seen["body_len"] == n
            assert "x-l7fp-added: kernel" in seen["headers"], seen
    finally:
        a.stop()
