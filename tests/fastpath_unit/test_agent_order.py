"""The agent's plans thread (fastpath.agent.Agent._apply_pending), with the
compile replaced by a recorder: re-applies of loaded nodes come first, at most
one new node is compiled per turn, a node waits (a little) for the plans of the
pods it calls, and a destination's new plan re-applies its clients only when
their merged plan changes."""

from __future__ import annotations

from typing import Any

import pytest

from fastpath import agent as A
from fastpath.agent_node import PodInfo
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Direction,
    Endpoint,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    PathKind,
    Rbac,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)


def client(node: str, dst_ip: str) -> KernelPlan:
    vh = VirtualHost("d", ("*",), (Route("r", RouteMatch(PathKind.PREFIX, "/"), ClusterAction(
        (WeightedCluster("d", 1),)), Verdict.KERNEL),))
    lp = ListenerPlan("198.19.0.9_80", "198.19.0.9", 80, Direction.OUTBOUND, (vh,))
    return KernelPlan(node, "v", (lp,), (Cluster("d", LbPolicy.RANDOM, (Endpoint(dst_ip, 80),)),))


def dest(node: str, rbac: bool) -> KernelPlan:
    vh = VirtualHost("in", ("*",), (Route("r", RouteMatch(PathKind.PREFIX, "/"), ClusterAction(
        (WeightedCluster("inbound|80||", 1),)), Verdict.KERNEL),))
    deny = Rbac("DENY", ())
    lp = ListenerPlan("virtualInbound", "0.0.0.0", 80, Direction.INBOUND, (vh,),
                      rbac=deny if rbac else None, rbacs=(deny,) if rbac else ())
    return KernelPlan(node, "d" + str(rbac), (lp,), (Cluster(
        "inbound|80||", LbPolicy.RANDOM, (Endpoint("127.0.0.1", 80),)),))


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Any:
    a = A.Agent(None, decide="l7fp")
    a.pods = {n: PodInfo(n, n, f"/cg/{n}", None, f"198.18.0.{i}") for i, n in
              enumerate(("c1", "c2", "dst"), start=1)}
    a.applied = []

    def fake_apply(node_id: str, plan: KernelPlan, merged: Any) -> None:
        a.applied.append((node_id, merged.plan.version))
        a.nodes[node_id] = object()

    monkeypatch.setattr(a, "_apply", fake_apply)
    return a


def test_one_compile_per_turn_and_reapplies_first(agent: Any) -> None:
    agent.on_plan("dst", dest("dst", False))
    agent.on_plan("c1", client("c1", "198.18.0.3"))
    agent.on_plan("c2", client("c2", "198.18.0.3"))
    agent._apply_pending()
    assert len(agent.applied) == 1  # one new node compiled this turn
    agent._apply_pending()
    agent._apply_pending()
    assert {n for n, _ in agent.applied} == {"c1", "c2", "dst"}
    agent.applied.clear()
    agent.pending |= {"c1", "c2"}  # a state-file re-apply: loaded nodes, all in one turn
    agent._apply_pending()
    assert sorted(n for n, _ in agent.applied) == ["c1", "c2"]


def test_clients_follow_a_destinations_inbound_policy(agent: Any) -> None:
    agent.on_plan("dst", dest("dst", False))
    agent.on_plan("c1", client("c1", "198.18.0.3"))
    for _ in range(3):
        agent._apply_pending()
    agent.applied.clear()
    agent.on_plan("dst", dest("dst", False))  # same plan again: nothing to redo for c1
    agent._apply_pending()
    assert [n for n, _ in agent.applied] == ["dst"]
    agent.applied.clear()
    agent.on_plan("dst", dest("dst", True))  # inbound RBAC now: c1's merged plan changes
    agent._apply_pending()
    assert sorted(n for n, _ in agent.applied) == ["c1", "dst"]
    assert any("+in" in v for n, v in agent.applied if n == "c1")


def test_first_compile_waits_for_the_destinations_plan(agent: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    agent.on_plan("c1", client("c1", "198.18.0.3"))  # dst is a known pod without a plan yet
    agent._apply_pending()
    assert agent.applied == [] and "c1" in agent.pending
    monkeypatch.setattr(A, "FIRST_APPLY_WAIT", 0.0)
    agent._apply_pending()  # waited long enough: compile without it
    assert [n for n, _ in agent.applied] == ["c1"]


def test_a_node_is_due_until_its_plan_and_its_destinations_merge_are_applied(
        agent: Any) -> None:
    """/debug/fastpath "plans_due" (mesh.ready waits for it to be empty): a node
    is due while its plan waits, while it is applied, and again when a
    destination's plan arrives (its merged plan may change: a re-apply or a
    rebuild)."""
    applying = []
    apply = agent._apply

    def recording(node_id: str, plan: KernelPlan, merged: Any) -> None:
        applying.append((node_id, agent.plans_due()))
        apply(node_id, plan, merged)

    agent._apply = recording
    agent.on_plan("dst", dest("dst", False))
    agent.on_plan("c1", client("c1", "198.18.0.3"))
    assert agent.plans_due() == ["c1", "dst"]
    for _ in range(3):
        agent._apply_pending()
    assert all(node_id in due for node_id, due in applying), applying
    assert agent.plans_due() == []
    applying.clear()
    agent.on_plan("dst", dest("dst", True))
    assert agent.plans_due() == ["c1", "dst"]  # c1 rechecks its merge
    agent._apply_pending()  # both in one turn: the first is no longer due at the second
    (first, _), (second, due) = applying
    assert second in due and first not in due, applying
    assert agent.plans_due() == []
