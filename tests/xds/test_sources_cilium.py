"""`l7fp serve --config DIR` with CiliumEnvoyConfig files: names, config sources,
listener addresses and the endpoints file (xds_server.sources.cilium_files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from xds_server.sources import cilium, cilium_files
from xds_server.sources.files import ConfigError, load_directory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cilium"


def cec(kind: str = "CiliumEnvoyConfig") -> dict:
    return yaml.safe_load((EXAMPLES / "helloworld-cec.yaml").read_text()) | {"kind": kind}


def test_prepare_qualifies_names_as_cilium_agent() -> None:
    items = {i["@type"].rsplit(".", 1)[-1]: i for i in cilium_files.prepare(cec())}
    lis = items["Listener"]
    assert lis["name"] == "default/helloworld/envoy-lb-listener"
    port = cilium.proxy_port("default/helloworld/envoy-lb-listener")
    assert lis["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    assert 10000 <= port < 15000
    rds = lis["filter_chains"][0]["filters"][0]["typed_config"]["rds"]
    assert rds == {"route_config_name": "default/helloworld/lb_route", "config_source": cilium_files.ADS}
    assert items["RouteConfiguration"]["name"] == "default/helloworld/lb_route"
    # clusters named NS/SERVICE keep their name, and get ADS as their EDS source
    assert items["Cluster"]["name"] == "default/helloworld-v2"
    assert items["Cluster"]["eds_cluster_config"] == {
        "service_name": "default/helloworld-v2:http", "eds_config": cilium_files.ADS}


def test_prepare_plain_names_and_clusterwide() -> None:
    doc = cec("CiliumClusterwideEnvoyConfig")
    rc = doc["spec"]["resources"][1]
    rc["virtual_hosts"][0]["routes"][0]["route"] = {"cluster": "local", "request_mirror_policies": [
        {"cluster": "shadow"}]}
    doc["spec"]["resources"].append({"@type": cilium.CLUSTER, "name": "local", "type": "STATIC"})
    items = cilium_files.prepare(doc)
    route = items[1]["virtual_hosts"][0]["routes"][0]["route"]
    # a clusterwide config has no namespace: `/CEC/NAME`, as cilium's ResourceQualifiedName
    assert route == {"cluster": "/helloworld/local", "request_mirror_policies": [{"cluster": "/helloworld/shadow"}]}
    assert items[0]["name"] == "/helloworld/envoy-lb-listener"
    assert items[-1]["name"] == "/helloworld/local"
    assert doc["spec"]["resources"][-1]["name"] == "local"  # the input is not changed


def test_directory_with_cecs_and_services(tmp_path: Path) -> None:
    for f in EXAMPLES.iterdir():
        shutil.copy(f, tmp_path)
    second = cec()
    # same listener and route names: qualified apart, as in Cilium; the clusters
    # named NS/SERVICE are global names: the first CEC's serve the second one
    second["metadata"]["name"] = "other"
    second["spec"]["resources"] = second["spec"]["resources"][:2]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(second))
    cache: dict = {}
    files = load_directory(tmp_path, cache)
    eds = {f.path: f for f in files}[cilium_files.ENDPOINTS_FILE]
    names = sorted(m.cluster_name for m in eds.resources[cilium.ENDPOINT])
    assert names == ["default/helloworld", "default/helloworld-v1", "default/helloworld-v1:*",
                     "default/helloworld-v2:http", "default/helloworld:*"]
    again = load_directory(tmp_path, cache)
    assert [id(f) for f in again] == [id(f) for f in files]  # nothing changed: the same objects
    services = tmp_path / "helloworld-services.yaml"
    services.write_text(services.read_text().replace("198.18.0.22", "198.18.0.32"))
    eds = {f.path: f for f in load_directory(tmp_path, cache)}[cilium_files.ENDPOINTS_FILE]
    v2 = [m for m in eds.resources[cilium.ENDPOINT] if m.cluster_name == "default/helloworld-v2:http"]
    assert v2[0].endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address == "198.18.0.32"


def test_directory_problems(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},  # ignored
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "v"}}]))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all([cec(), cec()]))
    with pytest.raises(ConfigError) as e:
        load_directory(tmp_path)
    assert e.value.problems == [
        "a.yaml: document 2: kind 'VirtualService' is not read here (Envoy resource files, "
        "CiliumEnvoyConfig, CiliumClusterwideEnvoyConfig, Service, EndpointSlice, Pod)",
        "b.yaml: duplicate Listener 'default/helloworld/envoy-lb-listener'",
        "b.yaml: duplicate RouteConfiguration 'default/helloworld/lb_route'",
        "b.yaml: duplicate Cluster 'default/helloworld-v1'",
        "b.yaml: duplicate Cluster 'default/helloworld-v2'"]
