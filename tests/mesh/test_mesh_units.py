"""Pure parts of the runner: names, addresses, iptables text, state document."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mesh import naming, netrules, spec, topology

DEMO = Path(__file__).resolve().parents[2] / "compose" / "demo" / "mesh.yaml"


def test_names_carry_the_mesh_and_fit_ifnamsiz() -> None:
    assert naming.netns_name("demo", "frontend-0") == "l7fp-demo-frontend-0"
    assert naming.link_alias("demo", "user-1") == "l7fp:demo:user-1"
    assert len(naming.bridge_name("a" * 23)) <= 15
    assert all(len(n) <= 15 for n in naming.veth_names("a" * 23, 249))
    assert naming.node_id("198.18.3.2", "user-0", "demo") == \
        "sidecar~198.18.3.2~user-0.demo~demo.svc.cluster.local"


def test_subnets_only_in_benchmark_range_and_avoid_taken() -> None:
    s = naming.pick_subnet("demo", set())
    assert s.pod_ip(0).startswith("198.18.") and s.vip(0).startswith("198.19.")
    s2 = naming.pick_subnet("demo", {s.octet})
    assert s2.octet != s.octet
    used = naming.octets_in_use(["198.18.7.0/24 dev x", "default via 1.2.3.4", "10.0.0.0/8 dev y"])
    assert used == {7}


def test_interception_rules_exclude_sidecar_uid_and_loopback() -> None:
    table = netrules.pod_nat_table("l7fp:t", [], sidecar=True)
    assert "--uid-owner 1337" in table and "REDIRECT --to-ports 15001" in table
    assert "REDIRECT --to-ports 15006" in table and "--dport 15000" in table
    # interception comes before the service DNAT
    assert table.index("-A OUTPUT -p tcp -m comment --comment \"l7fp:t\" -j ISTIO_OUTPUT") < \
        table.index("-j L7FP_SERVICES")
    assert "ISTIO" not in netrules.pod_nat_table("l7fp:t", [], sidecar=False)


def test_service_dnat_spreads_over_replicas() -> None:
    svc = netrules.ServiceAddr("u", "198.19.1.5", (9000,), ("198.18.1.2", "198.18.1.3"), ("u",))
    rules = [r for r in netrules.service_rules("c", [svc]) if "DNAT" in r]
    assert len(rules) == 2
    assert "--probability 0.50000" in rules[0] and "statistic" not in rules[1]


def test_state_document_matches_contract() -> None:
    s = spec.load(DEMO)
    topo = topology.build(s, naming.Subnet(9))
    doc = topology.state_doc(topo, pid=1, cgroups={p.name: f"/cg/{p.name}" for p in topo.pods},
                             pids={}, xds="198.18.9.1:1", admin="127.0.0.1:2",
                             config_dir="/x", extra={})
    pod = doc["pods"][0]
    assert set(pod) >= {"name", "service", "namespace", "netns", "cgroup", "ip", "ports",
                        "node_id", "envoy_admin", "pids"}
    assert pod["netns"] == "l7fp-demo-frontend-0" and pod["envoy_admin"] == 15000
    assert {s["name"] for s in doc["services"]} == set(s.services)
    assert len({p["ip"] for p in doc["pods"]}) == len(doc["pods"])


@pytest.mark.parametrize("kw", [{"input": b"x", "stdin": subprocess.DEVNULL},
                                {"capture_output": True, "stdout": subprocess.DEVNULL},
                                {"capture_output": True, "stderr": subprocess.DEVNULL}])
def test_run_in_pod_refuses_what_subprocess_run_refuses(kw: dict) -> None:
    """run_in_pod silently replaced stdin= when input was given, stdout=/stderr= with
    capture_output; subprocess.run raises ValueError for both (before any pod is looked up)."""
    from mesh.runner import run_in_pod
    with pytest.raises(ValueError) as ours:
        run_in_pod({"name": "none", "pods": []}, "nothing", ["true"], **kw)
    with pytest.raises(ValueError) as theirs:
        subprocess.run(["true"], **kw)
    assert str(ours.value) == str(theirs.value)


def test_gateway_pods_follow_the_service_pods_with_router_node_ids() -> None:
    s = spec.load(Path(__file__).resolve().parent / "gateway_mesh" / "mesh.yaml")
    topo = topology.build(s, naming.Subnet(9))
    assert [p.name for p in topo.all_pods()] == ["web-v1-0", "web-v2-0", "api-0", "ingress-0",
                                                 "spare-0"]
    ing = topo.gateways[0]
    assert (ing.ip, ing.index, ing.gateway) == ("198.18.9.5", 3, True)
    assert ing.node_id == "router~198.18.9.5~ingress-0.shop~shop.svc.cluster.local"
    assert not any(p.gateway for p in topo.pods)
    doc = topology.state_doc(topo, pid=1, cgroups={p.name: "/cg" for p in topo.all_pods()},
                             pids={}, xds=None, admin=None, config_dir="/x", extra={},
                             gateways_not_ready={"spare-0": "no Gateway selects it"})
    assert [p["name"] for p in doc["pods"]] == ["web-v1-0", "web-v2-0", "api-0"]
    gws = {g["name"]: g for g in doc["gateways"]}
    assert gws["ingress-0"]["labels"] == {"istio": "ingressgateway"}
    assert (gws["ingress-0"]["ready"], gws["spare-0"]["ready"]) == (True, False)
    assert gws["spare-0"]["not_ready"] == "no Gateway selects it"
    assert not any(g["ip"] in svc["pod_ips"] for g in doc["gateways"] for svc in doc["services"])
    assert "ISTIO" not in netrules.pod_nat_table("c", topo.services, sidecar=False)


@pytest.mark.parametrize("kw", [{"sidecars": "none"}, {"xds": "file"}])
def test_gateways_need_envoy_sidecars_over_ads(kw: dict) -> None:
    from mesh.runner import Mesh, MeshError
    with pytest.raises(MeshError, match="gateways need --sidecars envoy and --xds ads"):
        Mesh(Path(__file__).resolve().parent / "gateway_mesh" / "mesh.yaml", **kw)


def test_gateways_are_not_in_the_docker_files() -> None:
    from mesh import compose
    with pytest.raises(spec.MeshFileError, match="gateways: not in the Docker files"):
        compose.project(spec.load(Path(__file__).resolve().parent / "gateway_mesh" / "mesh.yaml"))
