"""The admin API's REST endpoints given a wrong body or path: a 400 that says what is
wrong in one line (docs/control-plane.md "REST")."""

from __future__ import annotations

import aiohttp

from xds_server import resources as res
from xds_server.serve import options, running

from .helpers import cluster


async def test_rest_says_what_is_wrong(config_dir) -> None:
    config_dir.write("c.yaml", [cluster("a")])
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as srv:
        base = f"http://127.0.0.1:{srv.admin_port}/config/nodes/n1/resources"
        async with aiohttp.ClientSession() as s:
            # was PyYAML's text joined: `... in "<unicode string>", line 1, column 1: {not json ^ ...`
            r = await s.put(base, data="{not json")
            assert (r.status, await r.json()) == (400, {
                "error": "body: not valid YAML/JSON: line 1, column 10: expected ',' or '}', "
                         "but got '<stream end>'"})
            # was a 404 `no cluster 'a' for node 'n1'`, as if the name were wrong
            r = await s.delete(base + "/cluster/a")
            assert (r.status, await r.json()) == (400, {
                "error": "type 'cluster': expected one of cds, eds, lds, rds, sds or a type URL"})
            assert (await s.put(base, json={"resources": [cluster("b")]})).status == 200
            url = res.CLUSTER.replace("/", "%2F")  # a type URL in the path, its '/' escaped
            r = await s.delete(f"{base}/{url}/b")
            assert r.status == 200, await r.text()
