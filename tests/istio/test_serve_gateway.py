"""`l7fp serve --policies` serving an ingress gateway (a router node) to a real Envoy.

One `l7fp serve` with the policies of tests/istio/gateway/policies (an Istio
Gateway, two VirtualServices bound to it, one bound to the mesh; a Gateway
API Gateway with an HTTPRoute) serves a real Envoy started as a router node
(`router~...`, LABELS selecting both Gateways) and a sidecar; loopback
backends answer with their pod name. Requests go to the gateway's listeners
with Host headers. The generation's shape and warnings are tested in
test_gateway.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import pick_free_port
from tests.istio.conftest import new_envoy, new_serve, wait_for
from tests.istio.harness import Backend
from xds_server import istio

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
HERE = Path(__file__).parent / "gateway"
ROUTER = "router~127.0.0.130~istio-ingressgateway-1.istio-system~istio-system.svc.cluster.local"
ROUTER_LABELS = {"istio": "ingressgateway", "gateway.networking.k8s.io/gateway-name": "edge"}
SIDECAR = "sidecar~127.0.0.121~web-v1.default~default.svc.cluster.local"
PODS = {"web-v1": "127.0.0.121", "web-v2": "127.0.0.122", "api-v1": "127.0.0.123"}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Policies and mesh file on picked ports; the backends listening there."""
    gw_port, api_gw_port = pick_free_port(), pick_free_port()
    web_port, api_port = pick_free_port(), pick_free_port()
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "istio.yaml").write_text((HERE / "policies" / "istio.yaml").read_text()
                                    .replace("number: 8080", f"number: {gw_port}"))
    (pol / "gateway-api.yaml").write_text(
        (HERE / "policies" / "gateway-api.yaml").read_text()
        .replace("port: 8081", f"port: {api_gw_port}")
        .replace("{name: api, port: 9080}", f"{{name: api, port: {api_port}}}")
        .replace("{name: web, port: 9080}", f"{{name: web, port: {web_port}}}"))
    mesh = (HERE / "mesh.yaml").read_text().replace(
        "name: web, ports: [{port: 9080", f"name: web, ports: [{{port: {web_port}").replace(
        "name: api, ports: [{port: 9080", f"name: api, ports: [{{port: {api_port}")
    (tmp_path / "mesh.yaml").write_text(mesh)
    started = []
    try:
        for pod, ip in PODS.items():
            started.append(Backend(pod, ip, api_port if pod.startswith("api") else web_port))
        yield {"policies": pol, "mesh": tmp_path / "mesh.yaml", "gw_port": gw_port,
               "api_gw_port": api_gw_port}
    finally:
        for b in started:
            b.close()


async def _get(port: int, host: str, headers: dict[str, str] | None = None,
               path: str = "/") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{port}{path}", headers={"Host": host, **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.text()


def _names(dump: dict[str, Any]) -> dict[str, set[str]]:
    """Names of the dynamic (xDS) listeners, route configurations and clusters."""
    out: dict[str, set[str]] = {"listeners": set(), "routes": set(), "clusters": set()}
    for c in dump["configs"]:
        kind = c["@type"].rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump":
            out["listeners"] |= {x["name"] for x in c.get("dynamic_listeners", [])}
        elif kind == "RoutesConfigDump":
            out["routes"] |= {x["route_config"]["name"] for x in c.get("dynamic_route_configs", [])}
        elif kind == "ClustersConfigDump":
            out["clusters"] |= {x["cluster"]["name"] for x in c.get("dynamic_active_clusters", [])}
    return out


async def test_gateway_routes_bound_virtual_services(setup: dict[str, Any], tmp_path: Path,
                                                     serves: list, envoys: list,
                                                     envoy_bin: str) -> None:
    ports = f"{pick_free_port()},{pick_free_port()}"  # the sidecar's; no clash with 15001/15006
    cp = new_serve(serves, tmp_path, ["--policies", str(setup["policies"]), "--mesh-file",
                                      str(setup["mesh"]), "--capture-ports", ports])
    await cp.wait_ready()
    gw = setup["gw_port"]
    router = new_envoy(envoys, envoy_bin, cp.xds_port, ROUTER, {"LABELS": ROUTER_LABELS})
    sidecar = new_envoy(envoys, envoy_bin, cp.xds_port, SIDECAR,
                        {"LABELS": {"app": "web", "version": "v1"}})

    async def shop_answers() -> bool:
        try:
            return (await _get(gw, "shop.example.com", {"end-user": "jason"}))[0] == 200
        except aiohttp.ClientError:  # listener not there yet
            return False

    await wait_for(shop_answers, 60)
    # header match, then the 50/50 split of the gateway-only VirtualService
    for _ in range(5):
        assert await _get(gw, "shop.example.com", {"end-user": "jason"}) == (200, "web-v2 /")
    seen = Counter([(await _get(gw, "shop.example.com:80"))[1] for _ in range(40)])
    assert set(seen) == {"web-v1 /", "web-v2 /"}, seen  # all 40 on one side: p = 2 * 0.5^40
    assert await _get(gw, "v1.api.example.com") == (200, "api-v1 /")  # server host *.api.example.com
    # a host of the VirtualService the server does not allow, a mesh-only host, any other
    for host in ("blocked.example.com", "mesh-only.example.com", "web"):
        code, _ = await _get(gw, host)
        assert code == 404, host  # Envoy's: no virtual host matches
    # The Gateway API Gateway's HTTP listener and its HTTPRoute (PathPrefix /api, then web)
    api_gw = setup["api_gw_port"]

    async def store_answers() -> bool:  # a listener of its own: it may warm after the first
        try:
            return await _get(api_gw, "www.shop.example.org", path="/api/x") == (200, "api-v1 /api/x")
        except aiohttp.ClientError:
            return False

    await wait_for(store_answers, 30)
    code, text = await _get(api_gw, "www.shop.example.org", path="/apix")
    assert code == 200 and text in ("web-v1 /apix", "web-v2 /apix")
    assert (await _get(api_gw, "other.example.org"))[0] == 404  # not in *.shop.example.org

    # The sidecar on the same server gets exactly its own config.
    mesh = istio.load(setup["policies"], mesh_file=setup["mesh"])
    want = istio.generate(mesh, SIDECAR, {"app": "web", "version": "v1"})
    want_names = {key: {x["name"] for x in want[url]} for key, url in (
        ("listeners", istio.sidecar.LISTENER), ("routes", istio.sidecar.ROUTE),
        ("clusters", istio.sidecar.CLUSTER))}

    async def sidecar_has_all() -> bool:
        try:
            return _names(await sidecar.config_dump()) == want_names
        except aiohttp.ClientError:
            return False

    await wait_for(sidecar_has_all, 60)
    text = json.dumps(await sidecar.config_dump())
    assert f"0.0.0.0_{gw}" not in text and "shop.example.com" not in text
    assert f"0.0.0.0_{api_gw}" not in text and "shop.example.org" not in text
    assert "http." not in " ".join(want_names["routes"])

    # A policy edit reaches the gateway over xDS: jason now goes to v1.
    text = (setup["policies"] / "istio.yaml").read_text()
    (setup["policies"] / "istio.yaml").write_text(
        text.replace("route: [{destination: {host: web, subset: v2}}]",
                     "route: [{destination: {host: web, subset: v1}}]", 1))

    async def jason_on_v1() -> bool:
        return await _get(gw, "shop.example.com", {"end-user": "jason"}) == (200, "web-v1 /")

    await wait_for(jason_on_v1, 30)
    (proxy,) = [p for p in await cp.get_json("/debug/syncz") if p["proxy"] == ROUTER]
    assert not any(t["last_nack_error"] for t in proxy["types"].values()), proxy["types"]
    assert router.proc is not None and router.proc.poll() is None
    # the servers not served are said where the importer's warnings are
    (src,) = [s for s in (await cp.get_json("/debug/adsz"))["sources"] if s["name"] == "istio"]
    assert sum(x.startswith("Gateway default/shop-gw: spec.servers[") for x in src["warnings"]) == 3
