"""CiliumEnvoyConfig: the assignments cilium-agent publishes (xds_server.sources.cilium)
and `l7fp split` with the Services given next to the CEC (fastpath.inputs_cilium)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from xds_server.cli import main
from xds_server.sources import cilium

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cilium"
CORPUS = Path("/work/shared/corpus/wild")


def svc(name: str, ports: list[dict[str, Any]], selector: dict[str, str] | None = None,
        ns: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": ports}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def eps(service: str, ports: list[dict[str, Any]], addrs: list[str], ready: bool = True,
        ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-x", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": ports, "endpoints": [{"addresses": addrs, "conditions": {"ready": ready}}]}


def pod(name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
            "labels": labels}, "status": {"podIP": ip}}


# Two ports, as cilium's own backendservices test: http 9080 and http-alt 9081,
# both to target 9080 on two pods, and a nameless single-port service.
OBJECTS = [
    svc("backend", [{"name": "http", "port": 9080, "targetPort": 9080},
                    {"name": "http-alt", "port": 9081, "targetPort": 9081}]),
    eps("backend", [{"name": "http", "port": 9080}, {"name": "http-alt", "port": 9080}],
        ["198.18.2.1", "198.18.2.2"]),
    svc("unnamed", [{"port": 9080, "targetPort": 9090}], selector={"app": "u"}),
    pod("u-0", "198.18.3.1", {"app": "u"}),
    svc("empty", [{"name": "http", "port": 80}]),
    eps("empty", [{"name": "http", "port": 8080}], ["198.18.4.1"], ready=False),
]


def assignments(wanted: dict[str, frozenset[str]]) -> dict[str, list[str]]:
    reg, warnings = cilium.registry(OBJECTS)
    assert warnings == []
    out = {}
    for cla in cilium.load_assignments(wanted, reg):
        lbs = cla["endpoints"][0]["lbEndpoints"]
        out[cla["clusterName"]] = [f"{e['endpoint']['address']['socketAddress']['address']}:"
                                   f"{e['endpoint']['address']['socketAddress']['portValue']}"
                                   for e in lbs]
    return out


def test_no_port_selected_publishes_any_port_and_the_bare_name() -> None:
    assert assignments({"default/backend": frozenset()}) == {
        "default/backend": ["198.18.2.1:9080", "198.18.2.2:9080"],
        "default/backend:*": ["198.18.2.1:9080", "198.18.2.2:9080"]}


def test_ports_selected_by_name_and_number() -> None:
    got = assignments({"default/backend": frozenset({"http", "9081"}),
                       "default/unnamed": frozenset({"9080"})})
    assert got == {"default/backend:http": ["198.18.2.1:9080", "198.18.2.2:9080"],
                   "default/backend:9081": ["198.18.2.1:9080", "198.18.2.2:9080"],
                   "default/unnamed:9080": ["198.18.3.1:9090"]}  # pod's target port


def test_missing_service_or_no_ready_endpoint_gets_no_assignment() -> None:
    assert assignments({"default/nope": frozenset(), "default/empty": frozenset()}) == {}


def test_why_missing_names_the_service_and_the_port() -> None:
    reg, _ = cilium.registry(OBJECTS)
    wanted = {"default/backend": frozenset({"http"}), "default/nope": frozenset(),
              "default/empty": frozenset()}
    assert cilium.why_missing("default/nope", wanted, reg) == "Service 'default/nope' not in the input"
    assert "no ready endpoint" in cilium.why_missing("default/empty:*", wanted, reg)
    assert "port '9081' of Service 'default/backend' not selected" in \
        cilium.why_missing("default/backend:9081", wanted, reg)
    assert "not in spec.services/backendServices" in cilium.why_missing("other/x", wanted, reg)


def test_service_refs_namespaces_and_port_union() -> None:
    cec = {"kind": "CiliumEnvoyConfig", "metadata": {"name": "c", "namespace": "shop"},
           "spec": {"services": [{"name": "front", "ports": [80]}],
                    "backendServices": [{"name": "b", "namespace": "other", "number": ["http"]},
                                        {"name": "front", "number": ["9090"]}]}}
    refs = cilium.service_refs(cec)
    assert [r.key for r in refs] == ["shop/front", "other/b", "shop/front"]
    assert cilium.ports_by_service(refs) == {"shop/front": frozenset({"80", "9090"}),
                                            "other/b": frozenset({"http"})}
    ccec = {"kind": "CiliumClusterwideEnvoyConfig", "metadata": {"name": "c"},
            "spec": {"services": [{"name": "front"}]}}
    assert [r.key for r in cilium.service_refs(ccec)] == ["default/front"]
    with pytest.raises(ValueError, match="CiliumEnvoyConfig shop/c: spec.services"):
        cilium.service_refs({**cec, "spec": {"services": [{"namespace": "x"}]}})


def split_json(capsys: pytest.CaptureFixture[str], *paths: str) -> dict[str, Any]:
    assert main(["split", "--json", *paths]) == 0
    return json.loads(capsys.readouterr().out)


def test_split_reads_the_services_next_to_the_cec(capsys: pytest.CaptureFixture[str]) -> None:
    out = split_json(capsys, str(EXAMPLES))
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [("KERNEL", "")]
    # names and the listener's address as `l7fp serve` serves them (cilium-agent's)
    assert out["routes"][0]["listener"] == "default/helloworld/envoy-lb-listener"
    assert out["routes"][0]["route_config"] == "default/helloworld/lb_route"
    assert main(["split", "--plan", str(EXAMPLES / "helloworld-cec.yaml")]) == 0
    plan = json.loads(capsys.readouterr().out)[0]["plan"]
    got = {c["name"]: [(e["address"], e["port"]) for e in c["endpoints"]] for c in plan["clusters"]}
    # v1 from its Pod (selector, target port), v2 from its EndpointSlice (the not-ready one left out)
    assert got == {"default/helloworld-v1": [("198.18.0.21", 5000)],
                   "default/helloworld-v2": [("198.18.0.22", 5001)]}


def test_split_without_the_services_names_them(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(EXAMPLES / "helloworld-cec.yaml", tmp_path)
    out = split_json(capsys, str(tmp_path))
    reason = out["routes"][0]["reason"]
    assert out["routes"][0]["verdict"] == "ENVOY"
    assert "cluster 'default/helloworld-v1': EDS endpoints not available " \
           "(Service 'default/helloworld-v1' not in the input)" in reason
    assert "'default/helloworld-v2': EDS endpoints not available " \
           "(Service 'default/helloworld-v2' not in the input)" in reason


def test_split_reads_the_directory_as_it_is_at_each_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The YAML, registry and listing caches hold for one split run only: the
    same process splitting the directory again after its Services were added
    (or a file changed) sees them."""
    shutil.copy(EXAMPLES / "helloworld-cec.yaml", tmp_path)
    assert split_json(capsys, str(tmp_path))["routes"][0]["verdict"] == "ENVOY"
    shutil.copy(EXAMPLES / "helloworld-services.yaml", tmp_path)
    assert split_json(capsys, str(tmp_path))["routes"][0]["verdict"] == "KERNEL"
    (tmp_path / "helloworld-services.yaml").write_text("")  # the same files, one now empty
    assert split_json(capsys, str(tmp_path))["routes"][0]["verdict"] == "ENVOY"


def test_split_port_not_selected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cec = yaml.safe_load((EXAMPLES / "helloworld-cec.yaml").read_text())
    cec["spec"]["backendServices"][1]["number"] = ["5000"]  # the cluster asks for :http
    (tmp_path / "cec.yaml").write_text(yaml.safe_dump(cec))
    shutil.copy(EXAMPLES / "helloworld-services.yaml", tmp_path)
    reason = split_json(capsys, str(tmp_path))["routes"][0]["reason"]
    assert "(port 'http' of Service 'default/helloworld-v2' not selected" in reason
    assert "helloworld-v1" not in reason


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not on this machine")
def test_corpus_cilium_reasons_name_the_services(capsys: pytest.CaptureFixture[str]) -> None:
    out = split_json(capsys, *map(str, sorted(CORPUS.glob("cilium__*"))))
    reasons = [r["reason"] for r in out["routes"]]
    assert reasons and all("not in the input)" in r for r in reasons)
    assert not any(r.endswith("EDS endpoints not available") for r in reasons)


def test_split_eds_cluster_named_without_slash_says_why(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An EDS cluster without service_name whose name has no '/': cilium-agent
    qualifies it (NS/CEC/NAME), Envoy asks EDS for that name, no Service has it.
    The reason names it so, not the unqualified name (whose why was lost)."""
    cec = yaml.safe_load((EXAMPLES / "helloworld-cec.yaml").read_text())
    route = cec["spec"]["resources"][1]["virtual_hosts"][0]["routes"][0]["route"]
    route["weighted_clusters"]["clusters"][0]["name"] = "helloworld-v1"
    cec["spec"]["resources"][2]["name"] = "helloworld-v1"
    (tmp_path / "cec.yaml").write_text(yaml.safe_dump(cec))
    shutil.copy(EXAMPLES / "helloworld-services.yaml", tmp_path)
    row = split_json(capsys, str(tmp_path))["routes"][0]
    assert row["verdict"] == "ENVOY"
    assert "cluster 'default/helloworld/helloworld-v1': EDS endpoints not available " \
           "('default/helloworld/helloworld-v1' names no Service: cilium-agent publishes " \
           "'NS/SERVICE' and 'NS/SERVICE:PORT', and qualifies a cluster name without '/' " \
           "as NS/CEC/NAME; set eds_cluster_config.service_name)" in row["reason"], row["reason"]
    assert "helloworld-v2" not in row["reason"]
