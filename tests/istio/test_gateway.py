"""What a router node (an ingress gateway) gets from the importer.

The Gateway's listener and route shape, which VirtualService hosts a server
allows, match-level `gateways`, the gateway Service's targetPort, Gateway
API Gateways and their HTTPRoutes, and the warnings for servers L7FP does not
serve. Behaviour with a real Envoy over `l7fp serve`: test_serve_gateway.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from xds_server import istio
from xds_server.istio.gateway import Server, allowed_host
from xds_server.istio.objects import Obj, ObjectSet, parse_documents
from xds_server.istio.registry import Endpoint, Port, Service
from xds_server.istio.sidecar import CLUSTER, ENDPOINT, LISTENER, ROUTE, Mesh

HERE = Path(__file__).parent / "gateway"
ROUTER = "router~198.18.0.130~istio-ingressgateway-1.istio-system~istio-system.svc.cluster.local"
GW_LABELS = {"istio": "ingressgateway"}
API_LABEL = "gateway.networking.k8s.io/gateway-name"
WEB = "web.default.svc.cluster.local"


@pytest.fixture
def mesh() -> Mesh:
    return istio.load(HERE / "policies", mesh_file=HERE / "mesh.yaml")


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filterChains"]
    (f,) = chain["filters"]
    return f["typedConfig"]  # type: ignore[no-any-return]


def _vhosts(res: dict[str, list[dict[str, Any]]], name: str) -> dict[str, dict[str, Any]]:
    (rc,) = [r for r in res[ROUTE] if r["name"] == name]
    return {vh["name"]: vh for vh in rc["virtualHosts"]}


def test_listener_and_route_shape(mesh: Mesh) -> None:
    res = istio.generate(mesh, ROUTER, GW_LABELS)
    (lis,) = res[LISTENER]  # the HTTPS, TLS and TCP servers are not served
    assert lis["name"] == "0.0.0.0_8080" and "bindToPort" not in lis
    assert lis["address"] == {"socketAddress": {"address": "0.0.0.0", "portValue": 8080}}
    hcm = _hcm(lis)
    assert hcm["useRemoteAddress"] is True
    assert hcm["rds"]["routeConfigName"] == "http.8080" and "ads" in hcm["rds"]["configSource"]
    assert hcm["httpFilters"][-1]["name"] == "envoy.filters.http.router"
    vhosts = _vhosts(res, "http.8080")
    assert sorted(vhosts) == ["shop.example.com:8080", "v1.api.example.com:8080"]
    shop = vhosts["shop.example.com:8080"]
    assert shop["domains"] == ["shop.example.com", "shop.example.com:*"]
    jason, split = shop["routes"]
    assert jason["match"]["headers"] == [{"name": "end-user", "stringMatch": {"exact": "jason"}}]
    assert jason["route"]["cluster"] == f"outbound|9080|v2|{WEB}"
    assert [c["name"] for c in split["route"]["weightedClusters"]["clusters"]] == [
        f"outbound|9080|v1|{WEB}", f"outbound|9080|v2|{WEB}"]
    assert "retryPolicy" in split["route"]  # istiod's default retries: the sidecars' route code
    # clusters and endpoints: the ones the routes name, as a sidecar's outbound ones
    named = {f"outbound|9080|v1|{WEB}", f"outbound|9080|v2|{WEB}",
             "outbound|9080||api.default.svc.cluster.local"}
    assert {c["name"] for c in res[CLUSTER]} == named
    assert all(c["type"] == "EDS" for c in res[CLUSTER])
    ends = {c["clusterName"]: [e["endpoint"]["address"]["socketAddress"]["address"]
                               for g in c["endpoints"] for e in g["lbEndpoints"]] for c in res[ENDPOINT]}
    assert ends[f"outbound|9080|v2|{WEB}"] == ["127.0.0.122"]
    sidecar = istio.generate(mesh, "sidecar~127.0.0.121~web-v1.default~default.svc.cluster.local")
    by_name = {c["name"]: c for c in sidecar[CLUSTER]}
    assert all(c == by_name[c["name"]] for c in res[CLUSTER])


def test_sidecar_gets_no_gateway_listener_nor_gateway_only_route(mesh: Mesh) -> None:
    res = istio.generate(mesh, "sidecar~127.0.0.121~web-v1.default~default.svc.cluster.local",
                         {"app": "web", "version": "v1"})
    assert "0.0.0.0_8080" not in {x["name"] for x in res[LISTENER]}
    assert not any(r["name"].startswith("http.") for r in res[ROUTE])
    domains = {d for rc in res[ROUTE] for vh in rc["virtualHosts"] for d in vh["domains"]}
    assert "shop.example.com" not in domains and "v1.api.example.com" not in domains
    web = _vhosts(res, "9080")[f"{WEB}:9080"]
    assert [r["route"]["cluster"] for r in web["routes"]] == [f"outbound|9080|v1|{WEB}"]


def test_router_selected_by_no_gateway_gets_nothing(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "xds_server.istio.gateway"):
        res = istio.generate(mesh, ROUTER, {"istio": "egressgateway"})
        # a Gateway API Gateway's label, but the Gateway is in another namespace
        other_ns = ROUTER.replace("istio-system", "default")
        assert istio.generate(mesh, other_ns, {API_LABEL: "edge"}) == res
    assert res == {LISTENER: [], ROUTE: [], CLUSTER: [], ENDPOINT: []}
    assert "no Gateway selects it; no listeners" in caplog.text


def test_servers_not_served_are_warned_at_load(mesh: Mesh) -> None:
    lines = [x for x in mesh.objs.warnings if x.startswith("Gateway ")]
    assert lines == [
        "Gateway default/shop-gw: spec.servers[1] (port 8443, https): protocol HTTPS terminates "
        "TLS (SIMPLE, credentialName 'shop-cert'): no Kubernetes secret source (SDS) in L7FP; "
        "server not served",
        "Gateway default/shop-gw: spec.servers[2] (port 9443, tls-pass): protocol TLS with TLS "
        "passthrough: L4 (SNI) routing is not implemented; server not served",
        "Gateway default/shop-gw: spec.servers[3] (port 5432, tcp-db): protocol TCP: only HTTP, "
        "HTTP2 and GRPC servers are served; server not served",
        "Gateway istio-system/edge: spec.listeners[1] (port 8444, https): protocol HTTPS "
        "terminates TLS (certificateRefs): no Kubernetes secret source (SDS) in L7FP; listener "
        "not served"]


def _server(*hosts: str) -> Server:
    return Server(Obj("Gateway", "gw", "edge", {}, {}), 80, hosts, False)


@pytest.mark.parametrize(("host", "vs_ns", "hosts", "served"), [
    ("shop.example.com", "default", ["shop.example.com"], "shop.example.com"),
    ("other.example.com", "default", ["shop.example.com"], ""),
    ("a.shop.example.com", "default", ["*.shop.example.com"], "a.shop.example.com"),
    ("shop.example.com", "default", ["*.shop.example.com"], ""),  # *.x does not cover x
    ("*", "default", ["shop.example.com"], "shop.example.com"),  # the narrower name
    ("*.example.com", "default", ["*.api.example.com"], "*.api.example.com"),
    ("shop.example.com", "default", ["*"], "shop.example.com"),
    ("shop.example.com", "default", ["default/shop.example.com"], "shop.example.com"),
    ("shop.example.com", "team", ["default/shop.example.com"], ""),  # NS/ admits NS only
    ("shop.example.com", "edge", ["./shop.example.com"], "shop.example.com"),  # the Gateway's NS
    ("shop.example.com", "default", ["./shop.example.com"], ""),
    ("shop.example.com", "team", ["*/shop.example.com"], "shop.example.com"),
])
def test_server_hosts_allow(host: str, vs_ns: str, hosts: list[str], served: str) -> None:
    assert allowed_host(host, vs_ns, _server(*hosts)) == served


def _mesh(docs: list[dict[str, Any]]) -> Mesh:
    objs = ObjectSet()
    parse_documents(docs, "test", objs)
    from xds_server.istio import gateway, registry
    from xds_server.istio.sidecar import mesh_from

    reg = registry.Registry()
    web = Service("web", "default", [Port(9080, "http", "http", 9080)])
    web.endpoints.append(Endpoint("198.18.0.21", {"app": "web"}))
    reg.add(web)
    gw_svc = Service("istio-ingressgateway", "istio-system", [Port(80, "http2", "http", 8080)])
    gw_svc.endpoints.append(Endpoint("198.18.0.130", GW_LABELS))
    reg.add(gw_svc)
    mesh = mesh_from(objs, reg)
    gateway.check_gateways(mesh)
    return mesh


GATEWAY = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
           "metadata": {"name": "edge", "namespace": "istio-system"},
           "spec": {"selector": GW_LABELS, "servers": [
               {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}}


def _vs(name: str, gateways: list[str], http: list[dict[str, Any]],
        hosts: tuple[str, ...] = ("shop.example.com",)) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": list(hosts), "gateways": gateways, "http": http}}


def test_match_gateways_and_target_port() -> None:
    """A match's own `gateways` picks where it applies; the gateway Service maps
    server port 80 to target port 8080, where istiod binds the listener."""
    route = {"route": [{"destination": {"host": "web"}}]}
    mesh = _mesh([GATEWAY, _vs("both", ["istio-system/edge", "mesh"], [
        {"name": "gw-only", "match": [{"gateways": ["istio-system/edge"], "uri": {"prefix": "/g"}}],
         **route},
        {"name": "mesh-only", "match": [{"gateways": ["mesh"], "uri": {"prefix": "/m"}}], **route},
        {"name": "any", **route}], hosts=("shop.example.com", "web"))])
    res = istio.generate(mesh, ROUTER, GW_LABELS)
    (lis,) = res[LISTENER]
    assert lis["name"] == "0.0.0.0_8080" and _hcm(lis)["rds"]["routeConfigName"] == "http.8080"
    vh = _vhosts(res, "http.8080")["shop.example.com:80"]
    assert [r["name"] for r in vh["routes"]] == ["gw-only", "any"]
    side = istio.generate(mesh, "sidecar~198.18.0.21~web-1.default~default.svc.cluster.local")
    (web,) = [vh for rc in side[ROUTE] for vh in rc["virtualHosts"] if vh["name"] == f"{WEB}:9080"]
    assert [r["name"] for r in web["routes"]] == ["mesh-only", "any"]


def test_no_bound_host_answers_404_and_unknown_gateway_is_warned() -> None:
    mesh = _mesh([GATEWAY, _vs("elsewhere", ["other-gw"], [{"route": [{"destination": {"host": "web"}}]}])])
    res = istio.generate(mesh, ROUTER, GW_LABELS)
    (vh,) = _vhosts(res, "http.8080").values()
    assert vh["domains"] == ["*"] and vh["routes"][0]["directResponse"] == {"status": 404}
    assert res[CLUSTER] == []
    assert ("VirtualService default/elsewhere: spec.gateways: 'default/other-gw' is no Istio "
            "Gateway of the policies; nothing serves this VirtualService there") in mesh.objs.warnings


def test_gateway_api_gateway_is_not_an_istio_gateway() -> None:
    gapi = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "istio-system"},
            "spec": {"gatewayClassName": "istio", "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"}]}}
    res = istio.generate(_mesh([gapi]), ROUTER, GW_LABELS)
    assert res[LISTENER] == []
    other = {**gapi, "spec": {**gapi["spec"], "gatewayClassName": "cilium"}}  # type: ignore[dict-item]
    mesh = _mesh([other])
    assert istio.generate(mesh, ROUTER, {API_LABEL: "edge"})[LISTENER] == []
    assert ("Gateway istio-system/edge: spec.gatewayClassName: 'cilium' is not 'istio': another "
            "controller's Gateway; not served") in mesh.objs.warnings


def test_https_redirect_requires_tls() -> None:
    gw = {**GATEWAY, "spec": {"selector": GW_LABELS, "servers": [
        {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"],
         "tls": {"httpsRedirect": True}}]}}
    mesh = _mesh([gw, _vs("r", ["istio-system/edge"], [{"route": [{"destination": {"host": "web"}}]}])])
    (vh,) = _vhosts(istio.generate(mesh, ROUTER, GW_LABELS), "http.8080").values()
    assert vh["requireTls"] == "ALL"
    assert not [x for x in mesh.objs.warnings if x.startswith("Gateway ")]


def test_gateway_api_gateway_and_its_httproutes(mesh: Mesh) -> None:
    """The Gateway API Gateway `edge` (gatewayClassName istio) selects the
    gateway istiod deploys for it (label gateway-name, same namespace); its
    HTTP listener serves the HTTPRoute hostnames its hostname allows."""
    res = istio.generate(mesh, ROUTER, {API_LABEL: "edge"})
    (lis,) = res[LISTENER]
    assert lis["name"] == "0.0.0.0_8081" and _hcm(lis)["useRemoteAddress"] is True
    vhosts = _vhosts(res, "http.8081")
    assert list(vhosts) == ["www.shop.example.org:8081"]  # other.example.org: not *.shop.example.org
    api, web = vhosts["www.shop.example.org:8081"]["routes"]
    assert api["match"] == {"pathSeparatedPrefix": "/api"}
    assert api["route"]["cluster"] == "outbound|9080||api.default.svc.cluster.local"
    assert web["route"]["cluster"] == f"outbound|9080||{WEB}"
    assert {c["name"] for c in res[CLUSTER]} == {"outbound|9080||api.default.svc.cluster.local",
                                                 f"outbound|9080||{WEB}"}


@pytest.mark.parametrize(("ref", "served"), [
    ({"name": "edge"}, True),  # the route's namespace
    ({"name": "edge", "sectionName": "http"}, True),
    ({"name": "edge", "sectionName": "other"}, False),
    ({"name": "edge", "port": 80}, True),
    ({"name": "edge", "port": 81}, False),
    ({"name": "edge", "namespace": "team"}, False),
    ({"name": "edge", "kind": "Service"}, False),  # GAMMA: the sidecars' route
])
def test_httproute_attaches_to_a_listener(ref: dict[str, Any], served: bool) -> None:
    gw = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
          "metadata": {"name": "edge", "namespace": "istio-system"},
          "spec": {"gatewayClassName": "istio", "listeners": [
              {"name": "http", "port": 80, "protocol": "HTTP"}]}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r", "namespace": "istio-system"},
             "spec": {"parentRefs": [ref], "rules": [{"backendRefs": [
                 {"name": "web", "namespace": "default", "port": 9080}]}]}}
    mesh = _mesh([gw, route])
    (vh,) = _vhosts(istio.generate(mesh, ROUTER, {API_LABEL: "edge"}), "http.8080").values()
    assert (vh["name"] == "*:80") is served  # else istiod's 404 for every host
