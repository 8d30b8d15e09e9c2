"""Rule 3, one owner per rate-limit bucket, on the control plane's side.

The residual drops Envoy's limiter of a KERNEL route only while the limiter
owner (the fast-path agent's predicate) says the kernel runs that node's plan
with its buckets; otherwise Envoy keeps it. Unit tests use a fake owner
predicate; the real one shows Envoy enforcing the limit when no agent owns it.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from fastpath import envoy_model as em
from fastpath.split import split_snapshot
from xds_server import resources as res
from xds_server.node import NodeInfo
from xds_server.server import XdsServer

from .conftest import http_get, start_envoy, wait_for
from .helpers import free_port, messages
from .limits_config import LIMIT, limited
from .test_server_unit import Static


def _disabled(snap) -> bool:
    """True when the served route `limited` has its limiter disabled."""
    (rc,) = [em.to_json(e.message if hasattr(e, "message") else e)
             for e in snap.of_type(res.ROUTE).values()]
    tpfc = rc["virtualHosts"][0]["routes"][0].get("typedPerFilterConfig", {})
    return any(v.get("disabled") for v in tpfc.values())


def _fake_split(calls):
    def splitter(node_id, resources):
        calls.append(node_id)
        resid = {t: list(v) for t, v in resources.items()}
        resid[res.LISTENER] = []  # marks the kernel-owner residual
        return SimpleNamespace(plan=SimpleNamespace(version="v1"), residual=resid,
                               envoy_residual=dict(resources))
    return splitter


def test_owner_flip_changes_residual_and_memo_keys_on_it():
    calls, plans = [], []
    owner = {"n1": False}
    srv = XdsServer([Static(messages(*limited(1, 2)))], splitter=_fake_split(calls))
    srv.add_plan_listener(lambda n, p: plans.append(n))
    srv.set_limit_owner(lambda n, plan: owner.get(n, False) and plan.version == "v1")
    srv.ensure_node(NodeInfo("n1"))
    assert list(srv.cache.get("n1").of_type(res.LISTENER)) == ["out"]  # Envoy keeps its limiter
    owner["n1"] = True
    assert srv.resplit(["n1"]).result(1) == 1
    assert list(srv.cache.get("n1").of_type(res.LISTENER)) == []  # the kernel's residual
    owner["n1"] = False
    assert srv.resplit(["n1"]).result(1) == 1
    assert list(srv.cache.get("n1").of_type(res.LISTENER)) == ["out"]
    srv.rebuild()
    assert calls == ["n1"] and plans == ["n1"]  # ownership flips never re-split nor re-announce


def test_owner_predicate_error_keeps_limiters(caplog):
    def broken(_n, _p):
        raise RuntimeError("agent gone")

    srv = XdsServer([Static(messages(*limited(1, 2)))], splitter=split_snapshot)
    srv.set_limit_owner(broken)
    srv.ensure_node(NodeInfo("n1"))
    assert not _disabled(srv.cache.get("n1"))
    assert "limiter owner check failed" in caplog.text


def test_real_split_strips_only_for_the_owner():
    srv = XdsServer([Static(messages(*limited(1, 2)))], splitter=split_snapshot)
    srv.ensure_node(NodeInfo("n1"))
    assert not _disabled(srv.cache.get("n1"))  # no agent: Envoy enforces
    version = srv.plans["n1"].version
    srv.set_limit_owner(lambda n, plan: plan.version == version)
    srv.resplit(["n1"]).result(1)
    assert _disabled(srv.cache.get("n1"))
    srv.set_limit_owner(None)
    srv.resplit(["n1"]).result(1)
    assert not _disabled(srv.cache.get("n1"))


async def test_resplit_from_another_thread_runs_on_the_loop():
    srv = XdsServer([Static(messages(*limited(1, 2)))], splitter=split_snapshot)
    await srv.start()
    try:
        srv.ensure_node(NodeInfo("n1"))
        srv.set_limit_owner(lambda n, plan: True)
        got = []
        t = threading.Thread(target=lambda: got.append(srv.resplit(["n1"]).result(2)))
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.01)
        assert got == [1] and _disabled(srv.cache.get("n1"))
    finally:
        await srv.stop()


@pytest.mark.envoy
async def test_envoy_enforces_limit_without_an_owning_agent(config_dir, serve, envoys, envoy_bin,
                                                            upstreams):
    """`l7fp serve --config DIR` (fast path auto: no agent here, or one with no
    pod for this node): the N+1-th request gets Envoy's 429."""
    lport = free_port()
    for i, d in enumerate(limited(upstreams["one"], lport)):
        config_dir.write(f"r{i}.yaml", [d])
    serve.start()
    await serve.wait_ready()
    start_envoy(envoys, envoy_bin, serve.xds_port, "sidecar~127.0.0.1~lim-0.t~t.svc.cluster.local",
                False)

    async def up():
        return (await http_get(lport, "/warm"))[0] in (200, 429)

    await wait_for(up, 20)
    # the warm-up took one token (or, served 429 by a not-yet-ready listener, none)
    statuses = [(await http_get(lport, f"/r{i}"))[0] for i in range(LIMIT + 1)]
    assert statuses[-2:] == [429, 429] and set(statuses) == {200, 429}, (statuses,
                                                                      serve.log()[-3000:])
