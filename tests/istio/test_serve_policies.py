"""`l7fp serve --policies DIR --mesh-file FILE` with a real Envoy sidecar over ADS.

Behaviour of the generated config is tested in test_envoy_behaviour.py; here:
the sidecar ACKs every type istiod would send (no NACK), gets subset clusters
with the right endpoints, and a policy edit reaches it without a restart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import pick_free_port
from tests.istio.conftest import new_envoy, new_serve, wait_for

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
HERE = Path(__file__).parent
NODE = "sidecar~198.18.0.10~productpage-v1.default~default.svc.cluster.local"


async def test_policies_served_acked_and_reloaded(tmp_path: Path, serves: list, envoys: list,
                                                  envoy_bin: str) -> None:
    pol = tmp_path / "policies"
    pol.mkdir()
    shutil.copy(HERE / "bookinfo" / "policies.yaml", pol / "policies.yaml")
    ports = f"{pick_free_port()},{pick_free_port()}"  # no clash with 15001/15006 on the host
    cp = new_serve(serves, tmp_path, ["--policies", str(pol), "--mesh-file",
                                      str(HERE / "bookinfo" / "mesh.yaml"), "--capture-ports", ports])
    await cp.wait_ready()
    envoy = new_envoy(envoys, envoy_bin, cp.xds_port, NODE,
                      {"LABELS": {"app": "productpage", "version": "v1"}})

    async def all_acked() -> bool:
        sync = await cp.get_json("/debug/syncz")
        if not sync:
            return False
        types = sync[0]["types"]
        return all(types.get(t, {}).get("acked") for t in ("cds", "eds", "lds", "rds"))

    await wait_for(all_acked, 60)
    (proxy,) = await cp.get_json("/debug/syncz")
    assert not any(t["last_nack_error"] for t in proxy["types"].values()), proxy["types"]

    async def reviews_v2_endpoint() -> bool:
        try:
            code, text = await envoy.get("/clusters")
        except aiohttp.ClientError:  # admin not listening yet
            return False
        return "outbound|9080|v2|reviews.default.svc.cluster.local::198.18.0.12:9080" in text

    await wait_for(reviews_v2_endpoint, 60)
    adsz = await cp.get_json("/debug/adsz")
    (istio,) = [s for s in adsz["sources"] if s["name"] == "istio"]
    assert istio["objects"] == 5 and istio["warnings"] == []

    # Edit the policy: reviews goes 100% to v3; the sidecar's route follows.
    text = (pol / "policies.yaml").read_text().replace("weight: 80", "weight: 0").replace(
        "weight: 20", "weight: 100")
    (pol / "policies.yaml").write_text(text)

    async def only_v3() -> bool:
        dump = await envoy.config_dump()
        routes = [r for c in dump["configs"] if c["@type"].endswith("RoutesConfigDump")
                  for rc in c.get("dynamic_route_configs", [])
                  for vh in rc["route_config"]["virtual_hosts"] if vh["name"].startswith("reviews.")
                  for r in vh["routes"]]
        return bool(routes) and routes[-1]["route"].get("cluster") == (
            "outbound|9080|v3|reviews.default.svc.cluster.local")

    await wait_for(only_v3, 60)
