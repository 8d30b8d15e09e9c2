"""XdsServer logic around the streams: split hook, plan listeners, debounce, Istio nodes."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.google.protobuf import Struct

from xds_server import resources as res
from xds_server.debounce import Debouncer
from xds_server.node import NodeInfo
from xds_server.server import XdsServer
from xds_server.sources.base import NodeResources, Source

from .helpers import cluster, listener, messages, route, route_config


class Static(Source):
    def __init__(self, resources):
        super().__init__()
        self.resources = resources
        self.gen = 0

    def resources_for(self, node):
        return NodeResources(("static", self.gen), self.resources)


def full():
    return messages(cluster("a"), cluster("b"), listener("l", 1, "r"),
                    route_config("r", [route("/a", "a"), route("/", "b")]))


def test_split_residual_served_and_plans_published():
    calls = []

    def splitter(node_id, resources):
        calls.append(node_id)
        kept = {t: list(v) for t, v in resources.items()}
        kept[res.CLUSTER] = [c for c in kept[res.CLUSTER]]  # residual: same resources
        return SimpleNamespace(plan=f"plan-for-{node_id}", residual=kept)

    srv = XdsServer([Static(full())], splitter=splitter)
    seen = []
    srv.add_plan_listener(lambda n, p: seen.append((n, p)))
    srv.ensure_node(NodeInfo("n1"))
    assert calls == ["n1"] and seen == [("n1", "plan-for-n1")] and srv.plans["n1"] == "plan-for-n1"
    assert sorted(srv.cache.get("n1").of_type(res.CLUSTER)) == ["a", "b"]
    late = []
    srv.add_plan_listener(lambda n, p: late.append(n))
    assert late == ["n1"]  # a late listener gets the current plans at once


def test_failing_split_serves_unsplit_snapshot(caplog):
    def splitter(node_id, resources):
        raise RuntimeError("classifier bug")

    srv = XdsServer([Static(full())], splitter=splitter)
    srv.ensure_node(NodeInfo("n1"))
    assert sorted(srv.cache.get("n1").of_type(res.CLUSTER)) == ["a", "b"]
    assert "fast path split failed for node n1" in caplog.text


def test_inconsistent_residual_refused_previous_stays(caplog):
    srv = XdsServer([Static(full())])
    srv.ensure_node(NodeInfo("n1"))
    good = srv.cache.get("n1")
    srv.sources[0].resources = messages(listener("l", 1, "r"))  # listener to a missing route config
    srv.sources[0].gen += 1
    assert srv.rebuild() == 0
    assert srv.cache.get("n1") is good
    assert "unknown route configuration 'r'" in srv.errors["n1"]


@pytest.mark.alone  # 0.25 s of slack on the debounce's timers
async def test_debounce_quiet_and_max():
    fired = []

    async def cb(born, count):
        fired.append((time.monotonic(), born, count))

    d = Debouncer(cb, quiet=0.05, max_wait=0.3)
    d.start()
    try:
        t0 = time.monotonic()
        for _ in range(3):
            d.trigger()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(fired) == 1 and fired[0][2] == 3  # one push for the burst
        for _ in range(40):  # a change every 20 ms: only max_wait forces pushes
            d.trigger()
            await asyncio.sleep(0.02)
        assert 2 <= len(fired) <= 6
        assert all(f[0] - f[1] <= 0.3 + 0.25 for f in fired)  # never later than max (+ slack)
        assert fired[0][1] >= t0
    finally:
        await d.stop()


def test_istio_node_with_metadata():
    meta = Struct.from_dict({"ISTIO_VERSION": "1.24.0", "CLUSTER_ID": "Kubernetes",
                             "LABELS": {"app": "frontend", "version": "v1"}, "NAMESPACE": "demo",
                             "INTERCEPTION_MODE": "REDIRECT"})
    node = NodeInfo.from_proto(Node(id="sidecar~198.18.0.2~frontend-0.demo~demo.svc.cluster.local",
                                    cluster="frontend.demo", metadata=meta))
    assert node.istio["pod"] == "frontend-0" and node.istio["namespace"] == "demo"
    assert node.metadata["LABELS"]["app"] == "frontend"


def test_split_skipped_when_node_config_unchanged():
    calls = []

    def splitter(node_id, resources):
        calls.append(node_id)
        return SimpleNamespace(plan="p", residual=dict(resources))

    src = Static(full())
    srv = XdsServer([src], splitter=splitter)
    srv.ensure_node(NodeInfo("n1"))
    srv.rebuild()
    assert calls == ["n1"]  # same resources key: not split again
    src.gen += 1
    srv.rebuild()
    assert calls == ["n1", "n1"]
