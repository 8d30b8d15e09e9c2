"""Relay mode with real processes: upstream `l7fp serve` <- relay `l7fp serve` <- real Envoy.

The upstream plays istiod (a second `l7fp serve` with a config directory). The
sidecar only knows the relay. Checked: config flows through, a change at the
upstream reaches the sidecar and the relay's kernel plan, the sidecar's NACK
is visible at the upstream, and killing the upstream keeps traffic flowing.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import pick_free_port
from tests.istio.conftest import new_envoy, new_serve, wait_for
from tests.istio.harness import Backend
from xds_server import resources as res

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
NODE = "sidecar~127.0.0.1~relay-0.test~test.svc.cluster.local"
HCM = res.HCM_URL
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ADS = {"ads": {}, "resource_api_version": "V3"}


def write_upstream(d: Path, lport: int, bport: int, version_body: str, bad_regex: bool = False) -> None:
    routes: list[dict[str, Any]] = [
        {"name": "v", "match": {"prefix": "/v"}, "direct_response": {
            "status": 200, "body": {"inline_string": version_body}}},
        {"name": "b", "match": {"prefix": "/"}, "route": {"cluster": "backend"}}]
    if bad_regex:  # Envoy rejects this regex: the sidecar NACKs RDS
        routes.insert(0, {"name": "bad", "match": {"safe_regex": {"regex": "(unclosed"}},
                          "direct_response": {"status": 418}})
    doc = {"resources": [
        {"@type": res.CLUSTER, "name": "backend", "type": "EDS", "connect_timeout": "1s",
         "eds_cluster_config": {"eds_config": ADS}},
        {"@type": res.ENDPOINT, "cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": bport}}}}]}]},
        {"@type": res.LISTENER, "name": "main",
         "address": {"socket_address": {"address": "127.0.0.1", "port_value": lport}},
         "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
             "@type": HCM, "stat_prefix": "main",
             "rds": {"route_config_name": "rc", "config_source": ADS},
             "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}]}}]}]},
        {"@type": res.ROUTE, "name": "rc",
         "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
    ]}
    tmp = d / ".config.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.rename(d / "config.json")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def test_relay_end_to_end(tmp_path: Path, serves: list, envoys: list, envoy_bin: str) -> None:
    updir = tmp_path / "upstream"
    updir.mkdir()
    lport, backend = pick_free_port(), Backend("backend", "127.0.0.1", pick_free_port())
    try:
        write_upstream(updir, lport, backend.server.server_address[1], "v1")
        up = new_serve(serves, tmp_path, ["--config", str(updir)])
        await up.wait_ready()
        relay = new_serve(serves, tmp_path, ["--upstream-xds", f"127.0.0.1:{up.xds_port}"])
        await relay.wait_ready()
        new_envoy(envoys, envoy_bin, relay.xds_port, NODE, {"LABELS": {"app": "relay"}})

        async def body_is(want: str) -> bool:
            return get(lport, "/v") == (200, want)

        await wait_for(lambda: body_is("v1"), 60)
        assert get(lport, "/data") == (200, "backend /data")  # EDS followed through the relay

        # The upstream sees the sidecar's own node identity, with its metadata.
        (proxy,) = await up.get_json("/debug/syncz")
        assert proxy["proxy"] == NODE and proxy["istio"]["pod"] == "relay-0"

        # A change at the upstream reaches the sidecar and the relay's kernel plan.
        write_upstream(updir, lport, backend.server.server_address[1], "v2")
        await wait_for(lambda: body_is("v2"), 60)
        relayz = await relay.get_json("/debug/relayz")
        plan = relayz[0]["sessions"][0]["plan"]
        assert plan is not None and "v2" in plan, plan

        # The sidecar's NACK reaches the upstream, with Envoy's error text.
        write_upstream(updir, lport, backend.server.server_address[1], "v3", bad_regex=True)

        async def upstream_saw_nack() -> bool:
            (p,) = await up.get_json("/debug/syncz")
            return bool(p["types"]["rds"]["last_nack_error"])

        await wait_for(upstream_saw_nack, 60)
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{relay.admin_port}/metrics") as r:
            metrics = await r.text()
        assert f'l7fp_relay_upstream_connected{{node="{NODE}"}} 1.0' in metrics
        nacks = [line for line in metrics.splitlines()
                 if line.startswith(f'l7fp_relay_verdicts_total{{node="{NODE}",verdict="nack"}}')]
        assert len(nacks) == 1 and float(nacks[0].split()[-1]) >= 1, metrics
        (p,) = await up.get_json("/debug/syncz")
        assert "(unclosed" in p["types"]["rds"]["last_nack_error"], p["types"]["rds"]
        assert get(lport, "/v") == (200, "v2")  # the last good routes stay in force

        # Killing the upstream keeps traffic flowing; the relay keeps the last config.
        up.stop(signal.SIGKILL)
        results = [get(lport, "/v") for _ in range(50)] + [get(lport, "/x") for _ in range(50)]
        assert results == [(200, "v2")] * 50 + [(200, "backend /x")] * 50

        async def disconnected() -> bool:
            return not (await relay.get_json("/debug/relayz"))[0]["sessions"][0]["connected"]

        await wait_for(disconnected, 60)
        assert get(lport, "/v") == (200, "v2")

        # The upstream comes back (same address) with new config: the relay reconnects.
        write_upstream(updir, lport, backend.server.server_address[1], "v4")
        up.start()
        await up.wait_ready()
        await wait_for(lambda: body_is("v4"), 60)
        relayz = await relay.get_json("/debug/relayz")
        assert relayz[0]["sessions"][0]["connects"] >= 2
    finally:
        backend.close()


async def test_relay_in_front_of_istio_like_upstream(tmp_path: Path, serves: list, envoys: list,
                                                     envoy_bin: str) -> None:
    """The upstream generates per sidecar (like istiod) from the node the relay passes on."""
    here = Path(__file__).parent / "bookinfo"
    ports = f"{pick_free_port()},{pick_free_port()}"
    up = new_serve(serves, tmp_path, ["--policies", str(here / "policies.yaml"),
                                      "--mesh-file", str(here / "mesh.yaml"), "--capture-ports", ports])
    await up.wait_ready()
    relay = new_serve(serves, tmp_path, ["--upstream-xds", f"127.0.0.1:{up.xds_port}"])
    await relay.wait_ready()
    node = "sidecar~198.18.0.10~productpage-v1.default~default.svc.cluster.local"
    envoy = new_envoy(envoys, envoy_bin, relay.xds_port, node, {"LABELS": {"app": "productpage"}})

    async def subset_endpoints() -> bool:
        assert envoy.proc is not None and envoy.proc.poll() is None, envoy.log_tail(40)
        try:
            _, text = await envoy.get("/clusters")
        except aiohttp.ClientError:  # admin not listening yet
            return False
        return "outbound|9080|v2|reviews.default.svc.cluster.local::198.18.0.12:9080" in text

    await wait_for(subset_endpoints, 60)
    async def upstream_acked() -> bool:  # the sidecar's ACKs reach the upstream
        (proxy,) = await up.get_json("/debug/syncz")
        return all(proxy["types"][t]["acked"] for t in ("cds", "eds", "lds", "rds"))

    try:
        await wait_for(upstream_acked, 60)
    except AssertionError:
        raise AssertionError(f"{await up.get_json('/debug/syncz')}\n"
                             f"{await relay.get_json('/debug/relayz')}") from None
    (proxy,) = await up.get_json("/debug/syncz")
    assert proxy["proxy"] == node
    (relayz,) = await relay.get_json("/debug/relayz")
    (sess,) = relayz["sessions"]
    assert sess["connected"] and sess["verdicts"]["nack"] == 0 and not sess["pending"]

    # The sidecar goes away: the relay closes its upstream stream.
    envoy.stop()

    async def upstream_forgot() -> bool:
        return await up.get_json("/debug/syncz") == [] and \
            (await relay.get_json("/debug/relayz"))[0]["sessions"] == []

    await wait_for(upstream_forgot, 60)
