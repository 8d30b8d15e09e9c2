"""Real Envoy against `l7fp serve --config DIR` holding a CiliumEnvoyConfig and the
Kubernetes Services whose endpoints cilium-agent would feed its EDS clusters."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastpath.plan import Verdict
from fastpath.split import split_snapshot
from xds_server.sources import cilium
from xds_server.sources.files import load_directory

from .conftest import http_get, start_envoy, wait_for

pytestmark = [pytest.mark.envoy]
NODE = "sidecar~127.0.0.1~cilium-0.test~test.svc.cluster.local"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def cec(name: str) -> dict[str, Any]:
    """Cilium's helloworld shape: no listener address, EDS clusters named NS/SERVICE,
    a weighted route; v2 asks for port `http` of its Service only."""
    def route(prefix: str, clusters: list[tuple[str, int]]) -> dict[str, Any]:
        return {"match": {"prefix": prefix}, "route": {"weighted_clusters": {"clusters": [
            {"name": c, "weight": w} for c, w in clusters]}}}
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "services": [{"name": "hello"}],
            "backendServices": [{"name": "hello-v1"}, {"name": "hello-v2", "number": ["http"]}],
            "resources": [
                {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "lb",
                 "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                     "@type": HCM, "stat_prefix": "lb", "rds": {"route_config_name": "lb_route"},
                     "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}]}}]}]},
                {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                 "name": "lb_route", "virtual_hosts": [{"name": "lb", "domains": ["*"], "routes": [
                     route("/v1", [("shop/hello-v1", 100)]),
                     route("/v2", [("shop/hello-v2", 100)]),
                     route("/", [("shop/hello-v1", 50), ("shop/hello-v2", 50)])]}]},
                {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                 "name": "shop/hello-v1", "connect_timeout": "1s", "type": "EDS"},
                {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                 "name": "shop/hello-v2", "connect_timeout": "1s", "type": "EDS",
                 "eds_cluster_config": {"service_name": "shop/hello-v2:http"}},
            ]}}


def services(ups: dict[str, int], unused: int) -> list[dict[str, Any]]:
    """v1: endpoints from its Pod (the Service's target port); v2: from its
    EndpointSlice, two ports, `http` the echo server and `admin` a closed port."""
    meta = {"namespace": "shop"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", **meta},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello-v1", **meta},
         "spec": {"selector": {"app": "hello", "version": "v1"},
                  "ports": [{"name": "http", "port": 80, "targetPort": ups["one"]}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "hello-v1-0", "labels": {"app": "hello", "version": "v1"}, **meta},
         "status": {"podIP": "127.0.0.1"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello-v2", **meta},
         "spec": {"ports": [{"name": "admin", "port": 81, "targetPort": "admin"},
                            {"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "hello-v2-x", "labels": {"kubernetes.io/service-name": "hello-v2"}, **meta},
         "ports": [{"name": "admin", "port": unused}, {"name": "http", "port": ups["two"]}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
    ]


def free_cec_name() -> tuple[str, int]:
    """A CEC name whose listener's proxy port (cilium.proxy_port) is free now."""
    for _ in range(50):
        name = f"hello-{random.randrange(1 << 30):x}"
        port = cilium.proxy_port(f"shop/{name}/lb")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return name, port
    raise AssertionError("no free proxy port")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_cilium_envoy_config_served(delta, config_dir, serve, envoys, envoy_bin, upstreams):
    name, lport = free_cec_name()
    unused = free_cec_name()[1]  # a closed port: v2's `admin` backends must not be used
    config_dir.write_text("cec.yaml", yaml.safe_dump(cec(name), sort_keys=False))
    config_dir.write_text("services.yaml", yaml.safe_dump_all(services(upstreams, unused)))
    serve.start()
    await serve.wait_ready()
    envoy = start_envoy(envoys, envoy_bin, serve.xds_port, NODE, delta)
    await envoy.wait_ready()

    async def answers(path: str, body: str) -> bool:
        return (await http_get(lport, path))[:2] == (200, body)

    await wait_for(lambda: answers("/v1", "one"), 15)
    assert await answers("/v2", "two")  # port `http` of hello-v2, not `admin`
    seen = [(await http_get(lport, "/"))[:2] for _ in range(40)]
    assert set(seen) == {(200, "one"), (200, "two")}, seen  # 50/50: both within 40 (1 in 10^11)
    assert f"bound to 127.0.0.1:{lport}" in serve.log()
    dump = await serve.get_json(f"/debug/config_dump?proxyID={NODE}")
    text = str(dump)
    assert f"shop/{name}/lb_route" in text and "shop/hello-v2:http" in text
    # the split of what was served: KERNEL routes over the backends Envoy reached
    plan = split_snapshot(NODE, served(config_dir.path)).plan
    assert [r.verdict for lp in plan.listeners for vh in lp.virtual_hosts for r in vh.routes] \
        == [Verdict.KERNEL] * 3
    assert {c.name: [(e.address, e.port) for e in c.endpoints] for c in plan.clusters} == {
        "shop/hello-v1": [("127.0.0.1", upstreams["one"])],
        "shop/hello-v2": [("127.0.0.1", upstreams["two"])]}


def served(directory: Path) -> dict[str, list[Any]]:
    """The resources `l7fp serve --config` serves every node from ``directory``."""
    out: dict[str, list[Any]] = {}
    for f in load_directory(directory):
        for type_url, msgs in f.resources.items():
            out.setdefault(type_url, []).extend(msgs)
    return out
