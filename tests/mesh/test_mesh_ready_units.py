"""mesh.ready.not_ready on /debug/fastpath views: each way a mesh is not yet
ready for a kernel probe (the races of docs/test-harness.md, "Readiness before
a kernel probe"), and the view that is."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh.ready import NotReady, not_ready, wait_ready


def pool(free: int, port: int = 9000) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "free": free}


READY: dict[str, Any] = {
    "pods_known": ["c", "d"], "plans_known": ["c", "d"], "plans_due": [], "nodes_failed": {},
    "nodes": [{"node": "c", "pod": "client-0", "plan_version": "v1+in1",
               "pools": [pool(3), pool(2, 9100)]},
              {"node": "d", "pod": "api-0", "plan_version": "v1", "pools": []}]}


def view(**change: Any) -> dict[str, Any]:
    dbg = copy.deepcopy(READY)
    dbg.update(change)
    return dbg


def client_pools(*pools: dict[str, Any]) -> dict[str, Any]:
    dbg = view()
    dbg["nodes"][0]["pools"] = list(pools)
    return dbg


@pytest.mark.parametrize(("dbg", "why"), [
    ({}, "no /debug/fastpath answer"),
    (view(nodes_failed={"d": "compile"}), "nodes failed"),
    (view(pods_known=[]), "no pod known yet"),
    (view(plans_known=["c"]), "pods without a plan at the agent: ['d']"),  # a late Envoy
    (view(plans_due=["c"]), "client-0: its plan is still to apply"),  # a rebuild may come
    (view(nodes=[dict(READY["nodes"][0], plan_version=None)]), "client-0: its plan is still"),
    (view(nodes=READY["nodes"][1:]), "no node loaded for pod client"),
    (client_pools(), "0 of 0 pools"),
    (client_pools(pool(3), pool(0, 9100)), "1 of 2 pools with 1+ free"),  # a refill behind
])
def test_not_ready_says_what_is_missing(dbg: dict[str, Any], why: str) -> None:
    assert why in not_ready(dbg, "client")


def test_ready_view() -> None:
    assert not_ready(READY, "client") == ""
    # another node's compile does not touch the client's: due only with every_node
    assert not_ready(view(plans_due=["d"]), "client") == ""
    assert "still to apply or recheck: ['d']" in not_ready(view(plans_due=["d"]), "client",
                                                           every_node=True)
    assert "1 of 2 pools with 3+ free" in not_ready(READY, "client", free=3)
    assert not_ready(client_pools(pool(3), pool(0, 9100)), "client", pools=1) == ""


def test_wait_raises_at_once_on_a_failed_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mesh.ready.fastpath_debug", lambda admin: view(nodes_failed={"d": "x"}))
    with pytest.raises(NotReady, match="not ready for client: nodes failed") as exc:
        wait_ready("127.0.0.1:1", timeout=60)
    assert "nodes failed" in exc.value.why and "/debug/fastpath" not in exc.value.why
