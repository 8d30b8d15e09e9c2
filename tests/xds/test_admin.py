"""Admin API pages with a live stream: healthz, syncz, config_dump, adsz, metrics, add_route."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from xds_server import admin
from xds_server import resources as res
from xds_server.client import AdsClient
from xds_server.serve import options, running

from .helpers import cluster, listener, route, route_config

NODE = "sidecar~198.18.0.9~web-0.shop~shop.svc.cluster.local"


async def test_admin_pages(config_dir):
    config_dir.write("all.yaml", [cluster("a"), listener("l", 1, "r"), route_config("r", [route("/", "a")])])
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, fastpath="off")) as srv:
        base = f"http://127.0.0.1:{srv.admin_port}"
        async with aiohttp.ClientSession() as s, AdsClient("127.0.0.1", srv.xds_port, NODE) as c:
            assert (await s.get(base + "/healthz/ready")).status == 200
            await c.send(res.CLUSTER)
            await c.recv()
            await c.ack(res.CLUSTER)
            await c.send(res.ROUTE, ["r"])
            await c.recv()
            (p,) = await (await s.get(base + "/debug/syncz")).json()
            assert p["proxy"] == NODE and p["istio"]["namespace"] == "shop"
            assert p["types"]["rds"]["pending"] and p["types"]["rds"]["names"] == ["r"]
            assert p["types"]["cds"]["acked"] == p["types"]["cds"]["sent"] != ""
            dump = await (await s.get(base + "/debug/config_dump", params={"proxyID": NODE})).json()
            assert [c["type_url"] for c in dump["configs"]] == [res.CLUSTER, res.LISTENER, res.ROUTE]
            assert dump["configs"][0]["resources"][0]["@type"] == res.CLUSTER
            assert (await s.get(base + "/debug/config_dump")).status == 400
            assert (await s.get(base + "/debug/config_dump", params={"proxyID": "nope"})).status == 404
            adsz = await (await s.get(base + "/debug/adsz")).json()
            assert adsz["connections"][0]["proxy"] == NODE and NODE in adsz["nodes"]
            assert adsz["sources"][0]["name"] == "files"
            text = await (await s.get(base + "/metrics")).text()
            assert 'pilot_xds_pushes_total{type="cds"} 1.0' in text
            assert 'pilot_xds{kind="sotw"} 1.0' in text


async def test_add_route_before_start():
    from xds_server.server import XdsServer

    app = admin.build_admin(XdsServer([]))

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"fastpath": "here"})

    admin.add_route(app, "/debug/fastpath-test", hello)
    assert any(r.resource.canonical == "/debug/fastpath-test" for r in app.router.routes() if r.resource)
