"""Generated sidecar resources: shapes, and real Envoy accepts them (--mode validate)."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import envoyconf as ec
from mesh import naming, spec, topology

DEMO = Path(__file__).resolve().parents[2] / "compose" / "demo" / "mesh.yaml"


def demo_pod(name: str) -> tuple[spec.MeshSpec, topology.Topology, topology.Pod]:
    s = spec.load(DEMO)
    topo = topology.build(s, naming.Subnet(9))
    return s, topo, next(p for p in topo.pods if p.name == name)


def vhost(routes: dict, port: int, service: str) -> dict:
    return routes[f"outbound|{port}||{service}.demo.svc.cluster.local"]["virtual_hosts"][0]


def test_outbound_routes_resolve_short_names_and_canary() -> None:
    s, topo, pod = demo_pod("frontend-0")
    res = ec.pod_resources(s, pod.info(), list(topo.services), ec.Delivery("ads"))
    routes = {r["name"]: r for r in res[ec.ROUTE]}
    user = vhost(routes, 9000, "user")
    assert user["routes"][0]["route"]["cluster"] == "outbound|9000||user-v2.demo.svc.cluster.local"
    weights = {c["name"]: c["weight"] for c in user["routes"][1]["route"]["weighted_clusters"]["clusters"]}
    assert weights == {"outbound|9000||user.demo.svc.cluster.local": 90,
                       "outbound|9000||user-v2.demo.svc.cluster.local": 10}
    front = vhost(routes, 8080, "frontend")["routes"]
    assert front[0]["route"]["cluster"] == "outbound|8000||static.demo.svc.cluster.local"
    assert front[1]["route"]["cluster"] == "outbound|8080||frontend.demo.svc.cluster.local"
    # Istio's default: no route timeout unless the policy sets one
    assert vhost(routes, 9000, "social-graph")["routes"][0]["route"]["timeout"] == "0s"
    assert front[1]["route"]["timeout"] == "5s"
    listeners = {x["name"]: x for x in res[ec.LISTENER]}
    assert listeners["virtualOutbound"]["address"]["socket_address"]["port_value"] == 15001
    assert listeners["virtualOutbound"]["use_original_dst"] is True
    assert listeners["virtualInbound"]["address"]["socket_address"]["port_value"] == 15006
    user_vip = next(sv.vip for sv in topo.services if sv.name == "user")
    assert listeners[f"{user_vip}_9000"]["bind_to_port"] is False
    # every EDS cluster has its load assignment
    eds = {c["name"] for c in res[ec.CLUSTER] if c.get("type") == "EDS"}
    assert eds == {c["cluster_name"] for c in res[ec.CLA]}


def test_outbound_filter_only_for_its_service() -> None:
    s, topo, pod = demo_pod("compose-post-0")
    res = ec.pod_resources(s, pod.info(), list(topo.services), ec.Delivery("ads"))
    vips = {sv.name: sv.vip for sv in topo.services}
    listeners = {x["name"]: x for x in res[ec.LISTENER]}

    def filters(svc: str) -> list[str]:
        hcm = listeners[f"{vips[svc]}_9000"]["filter_chains"][0]["filters"][0]["typed_config"]
        return [f["name"] for f in hcm["http_filters"]]
    assert filters("text") == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert filters("user") == ["envoy.filters.http.router"]


def test_inbound_policy_only_in_own_sidecar() -> None:
    s, topo, pod = demo_pod("post-storage-0")
    res = ec.pod_resources(s, pod.info(), list(topo.services), ec.Delivery("ads"))
    inbound = next(x for x in res[ec.LISTENER] if x["name"] == "virtualInbound")
    names = [f["name"] for f in inbound["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    s2, topo2, other = demo_pod("user-0")
    res2 = ec.pod_resources(s2, other.info(), list(topo2.services), ec.Delivery("ads"))
    inbound2 = next(x for x in res2[ec.LISTENER] if x["name"] == "virtualInbound")
    names2 = [f["name"] for f in inbound2["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
    assert names2 == ["envoy.filters.http.router"]


def static_bootstrap(res: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The ADS resources made static: RDS inlined, EDS replaced by load assignments."""
    routes = {r["name"]: r for r in res[ec.ROUTE]}
    clas = {c["cluster_name"]: c for c in res[ec.CLA]}
    listeners = copy.deepcopy(res[ec.LISTENER])
    for lst in listeners:
        lst.pop("@type")
        for chain in lst["filter_chains"]:
            hcm = chain["filters"][0]["typed_config"]
            if "rds" not in hcm:
                continue  # the TCP passthrough chain
            rc = dict(routes[hcm.pop("rds")["route_config_name"]])
            rc.pop("@type")
            hcm["route_config"] = rc
    clusters = []
    for c in copy.deepcopy(res[ec.CLUSTER]):
        c.pop("@type")
        if c.get("type") == "EDS":
            c.pop("eds_cluster_config")
            c["type"] = "STATIC"
            c["load_assignment"] = {k: v for k, v in clas[c["name"]].items() if k != "@type"}
        clusters.append(c)
    return {"static_resources": {"listeners": listeners, "clusters": clusters}}


@pytest.mark.envoy
@pytest.mark.parametrize("pod_name", ["frontend-0", "post-storage-0", "unique-id-0"])
def test_real_envoy_accepts_generated_config(envoy_bin: str, tmp_path: Path, pod_name: str) -> None:
    s, topo, pod = demo_pod(pod_name)
    res = ec.pod_resources(s, pod.info(), list(topo.services), ec.Delivery("ads"))
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(static_bootstrap(res)))
    proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.envoy
def test_real_envoy_accepts_leaf_and_sidecar_bootstraps(envoy_bin: str, tmp_path: Path) -> None:
    s, topo, pod = demo_pod("static-0")
    docs = {"leaf": ec.direct_response_bootstrap("static", (8000,)),
            "sidecar": ec.sidecar_bootstrap(pod.info(), "static.demo", ec.Delivery("ads"),
                                            ("198.18.9.1", 15010))}
    for name, doc in docs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (name, proc.stdout[-2000:] + proc.stderr[-2000:])


TRACED = """
name: tr
policies: pol.yaml
services:
  front:
    command: [sleep, "100"]
    ports: [8080]
    calls: [back]
  back:
    command: [sleep, "100"]
    ports: [9000]
  spans:
    command: [sleep, "100"]
    ports: [9411]
"""
ZIPKIN = {"name": "envoy.tracers.zipkin", "typed_config": {
    "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "spans",
    "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON"}}
TRACED_POLICY = {"back": {
    "outbound": {"tracing": {"random_sampling": {"value": 30}, "provider": ZIPKIN},
                 "routes": [{"match": {"prefix": "/"}, "decorator": {"operation": "back-call"}}]},
    "inbound": {"tracing": {"random_sampling": {"value": 30}, "overall_sampling": {"value": 50},
                            "provider": ZIPKIN}}}}


def traced_pod(tmp_path: Path, name: str) -> tuple[dict[str, list[dict[str, Any]]], topology.Topology]:
    (tmp_path / "pol.yaml").write_text(yaml.safe_dump(TRACED_POLICY))
    (tmp_path / "mesh.yaml").write_text(TRACED)
    s = spec.load(tmp_path / "mesh.yaml")
    topo = topology.build(s, naming.Subnet(9))
    pod = next(p for p in topo.pods if p.name == name)
    return ec.pod_resources(s, pod.info(), list(topo.services), ec.Delivery("ads")), topo


def _hcms(res: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {f["typed_config"]["stat_prefix"]: f["typed_config"] for lst in res[ec.LISTENER]
            for ch in lst["filter_chains"] for f in ch["filters"] if f["typed_config"].get("rds")}


def test_tracing_on_the_services_outbound_and_own_inbound_listeners(tmp_path: Path) -> None:
    res, _ = traced_pod(tmp_path, "front-0")
    hcms = _hcms(res)
    collector = "outbound|9411||spans.tr.svc.cluster.local"
    want = {"random_sampling": {"value": 30}, "provider": {**ZIPKIN, "typed_config": {
        **ZIPKIN["typed_config"], "collector_cluster": collector,
        "collector_hostname": "spans.tr.svc.cluster.local:9411"}}}  # no `|` in the Host
    assert hcms["outbound_back_9000"]["tracing"] == want  # every caller's sidecar, to back
    assert "tracing" not in hcms["outbound_front_8080"] and "tracing" not in hcms["inbound_8080"]
    assert collector in {c["name"] for c in res[ec.CLUSTER]}
    route = next(r for r in res[ec.ROUTE] if r["name"] == "outbound|9000||back.tr.svc.cluster.local")
    assert route["virtual_hosts"][0]["routes"][0]["decorator"] == {"operation": "back-call"}
    back, _ = traced_pod(tmp_path, "back-0")
    assert _hcms(back)["inbound_9000"]["tracing"]["overall_sampling"] == {"value": 50}
    assert TRACED_POLICY["back"]["outbound"]["tracing"]["provider"] == ZIPKIN  # not changed in place


@pytest.mark.envoy
def test_real_envoy_accepts_tracing_config(envoy_bin: str, tmp_path: Path) -> None:
    for pod in ("front-0", "back-0"):
        res, _ = traced_pod(tmp_path, pod)
        path = tmp_path / f"{pod}.yaml"
        path.write_text(yaml.safe_dump(static_bootstrap(res)))
        proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
