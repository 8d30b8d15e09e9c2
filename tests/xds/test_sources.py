"""Config directory and REST sources: parsing, one-line errors, last good config kept."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from xds_server import resources as res
from xds_server.client import AdsClient
from xds_server.serve import options, running
from xds_server.sources.files import ConfigError, load_directory

from .helpers import cluster, listener, route, route_config


def problems(config_dir) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_directory(config_dir.path)
    return err.value.problems


def test_good_directory_with_json_and_subdirs(config_dir):
    import json

    (config_dir.path / "sub").mkdir()
    (config_dir.path / "sub" / "c.json").write_text(json.dumps({"resources": [cluster("a")]}))
    (config_dir.path / ".hidden.yaml").write_text("not: [valid")
    config_dir.write("notes.txt", [])
    files = load_directory(config_dir.path)
    assert [f.path for f in files] == ["sub/c.json"]


@pytest.mark.parametrize("text, expect", [
    ("resources: [\n  {", "bad.yaml: while parsing"),
    ("- just a list", "bad.yaml: top level: expected a mapping"),
    ("resources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c\n  bogus_field: 1\n",
     "bad.yaml: resources[0]: Unknown field 'bogus_field' in message Cluster"),
    ("resources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c\n  connect_timeout: soon\n",
     "bad.yaml: resources[0].connect_timeout: 'soon' is not a duration"),
    ("resources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: [1]\n",
     "bad.yaml: resources[0]: name: Input should be a valid string"),
    ("resources:\n- '@type': type.googleapis.com/nope.Nope\n  name: x\n",
     "bad.yaml: resources[0].@type: unknown @type 'type.googleapis.com/nope.Nope'"),
    ("resources:\n- name: x\n", "bad.yaml: resources[0].@type: missing @type"),
    ("node_selector: {pod: x}\nresources: []\n", "bad.yaml: node_selector: expected a mapping"),
    ("resource: []\n", "bad.yaml: resource: unknown top-level key"),
])
def test_bad_file_gives_one_line_with_file_and_field(config_dir, text, expect):
    config_dir.write("good.yaml", [cluster("a")])
    config_dir.write_text("bad.yaml", text)
    (line,) = problems(config_dir)
    assert line.startswith(expect), line
    assert "\n" not in line


def test_unresolved_references_and_duplicates_are_named(config_dir):
    config_dir.write("l.yaml", [listener("l", 1, "missing-rc")])
    config_dir.write("r.yaml", [route_config("rc", [route("/", "ghost")])])
    got = problems(config_dir)
    assert "l.yaml: listener 'l' filter_chains[0].filters[0].rds.route_config_name: " \
           "unknown route configuration 'missing-rc'" in got
    assert "r.yaml: route configuration 'rc' virtual_hosts[0].routes[0].route.cluster: " \
           "unknown cluster 'ghost'" in got
    config_dir.remove("l.yaml")
    config_dir.write("r.yaml", [cluster("ghost")])
    config_dir.write("r2.yaml", [cluster("ghost")])
    (dup,) = problems(config_dir)
    assert "r2.yaml" in dup and "r.yaml" in dup and "'ghost'" in dup


async def test_bad_reload_keeps_last_good_config(config_dir, caplog):
    config_dir.write("c.yaml", [cluster("a")])
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as srv:
        async with AdsClient("127.0.0.1", srv.xds_port, "n") as c:
            await c.send(res.CLUSTER)
            first = await c.recv()
            await c.ack(res.CLUSTER)
            config_dir.write_text("c.yaml", "resources: [ {")
            for _ in range(100):
                if "config rejected" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert "config rejected, last good config keeps serving: c.yaml:" in caplog.text
            with pytest.raises(asyncio.TimeoutError):
                await c.recv(0.3)
            assert srv.server.cache.get("n").versions[res.CLUSTER] == first.version_info
            config_dir.write("c.yaml", [cluster("a"), cluster("b")])
            second = await c.recv(5)
            assert sorted(res.resource_name(a.unpack()) for a in second.resources) == ["a", "b"]


async def test_rest_put_delete_with_validation(config_dir):
    config_dir.write("c.yaml", [cluster("a")])
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as srv:
        base = f"http://127.0.0.1:{srv.admin_port}/config/nodes/n1/resources"
        async with aiohttp.ClientSession() as s, AdsClient("127.0.0.1", srv.xds_port, "n1") as c:
            await c.send(res.CLUSTER)
            await c.recv()
            await c.ack(res.CLUSTER)
            r = await s.put(base, json={"resources": [route_config("rc", [route("/", "nowhere")])]})
            assert r.status == 400 and "unknown cluster 'nowhere'" in (await r.json())["error"]
            r = await s.put(base, json={"resources": [{"@type": res.CLUSTER, "name": "x", "bad": 1}]})
            assert r.status == 400 and "resources[0]: Unknown field 'bad'" in (await r.json())["error"]
            r = await s.put(base, data=f"resources:\n- {{'@type': {res.CLUSTER}, name: b, connect_timeout: 1s}}\n")
            assert r.status == 200, await r.text()
            pushed = await c.recv(5)
            assert sorted(res.resource_name(a.unpack()) for a in pushed.resources) == ["a", "b"]
            await c.ack(res.CLUSTER)
            r = await s.put(base, json={"resources": [cluster("a")]})
            assert r.status == 400 and "defined twice" in (await r.json())["error"]
            assert (await (await s.get(base)).json())["resources"][0]["name"] == "b"
            r = await s.delete(base + "/cds/b")
            assert r.status == 200
            pushed = await c.recv(5)
            assert [res.resource_name(a.unpack()) for a in pushed.resources] == ["a"]
            assert (await s.delete(base + "/cds/b")).status == 404


async def test_empty_directory_serves_empty_config(config_dir):
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as srv:
        async with AdsClient("127.0.0.1", srv.xds_port, "n") as c:
            await c.send(res.CLUSTER)
            assert (await c.recv()).resources == []
            await c.ack(res.CLUSTER)
            config_dir.write("c.yaml", [cluster("a")])
            assert len((await c.recv(5)).resources) == 1
