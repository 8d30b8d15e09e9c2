"""The agent's side of limiter ownership (rule 3), with a fake server: what it
claims, what it releases and in which order it stops. The real server and
kernel are in tests/xds/test_limit_owner.py and tests/kernel_differential."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace
from typing import Any

from fastpath import agent as agent_mod
from fastpath.agent import Agent


class FakeServer:
    """Records the calls the agent makes; ACKs at once."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def set_limit_owner(self, pred: Any) -> None:
        self.calls.append(("owner", pred is not None))

    def resplit(self, ids: list[str]) -> concurrent.futures.Future[int]:
        self.calls.append(("resplit", list(ids)))
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        fut.set_result(len(ids))
        return fut

    def limits_acked(self, node_id: str) -> bool:
        return True


def plan(version: str) -> Any:
    return SimpleNamespace(version=version)


def test_claim_is_per_plan_version_and_resplits_once():
    a, srv = Agent(None), FakeServer()
    a.server = srv
    assert not a.owns_limits("n1", plan("v1"))
    a._claim("n1", plan("v1"))  # type: ignore[arg-type]
    a._claim("n1", plan("v1"))  # type: ignore[arg-type]
    assert srv.calls == [("resplit", ["n1"])]
    assert a.owns_limits("n1", plan("v1"))
    assert not a.owns_limits("n1", plan("v2"))  # a new plan is Envoy's until applied
    assert not a.owns_limits("n2", plan("v1"))


def test_release_pushes_back_before_returning_and_only_owned_nodes():
    a, srv = Agent(None), FakeServer()
    a.server = srv
    a.release(["n1"])  # not owned: nothing to push
    assert srv.calls == []
    a._claim("n1", plan("v1"))  # type: ignore[arg-type]
    a.release(["n1"])
    assert srv.calls == [("resplit", ["n1"]), ("resplit", ["n1"])]
    assert not a.owns_limits("n1", plan("v1")) and a.debug()["limits_owned"] == {}


def test_stop_hands_limiters_back_first():
    a, srv = Agent(None), FakeServer()
    a.server = srv
    a._claim("n1", plan("v1"))  # type: ignore[arg-type]
    srv.calls.clear()
    asyncio.run(agent_mod.stop(a))
    assert srv.calls == [("owner", False), ("resplit", ["n1"])]
    assert not a.owns_limits("n1", plan("v1"))  # stopped: owns nothing
