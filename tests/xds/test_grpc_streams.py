"""The grpclib servicer with real gRPC streams (in-process server, fake clients)."""

from __future__ import annotations

import asyncio

import grpclib
import grpclib.exceptions
import pytest
from envoy_data_plane.google.rpc import Status

from xds_server import resources as res
from xds_server.client import AdsClient
from xds_server.serve import options, running

from .helpers import cluster, listener, route, route_config


@pytest.fixture
async def srv(config_dir):
    config_dir.write("all.yaml", [cluster("a", 1), listener("l", 10000, "r"),
                                  route_config("r", [route("/", "a")])])
    config_dir.write("special.yaml", [cluster("only-special", 2)], node_selector={"cluster": "special*"})
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, debounce_ms=10, fastpath="off")) as r:
        yield r


def names(resp) -> list[str]:
    return sorted(res.resource_name(a.unpack()) for a in resp.resources)


async def test_first_request_without_node_is_an_error(srv, caplog):
    async with AdsClient("127.0.0.1", srv.xds_port, "") as c:
        await c.send(res.CLUSTER)
        # the server ends the stream with INVALID_ARGUMENT; grpclib's client sometimes
        # sees the stream reset that follows the trailers first
        with pytest.raises((grpclib.GRPCError, grpclib.exceptions.StreamTerminatedError)) as err:
            await c.recv()
        if isinstance(err.value, grpclib.GRPCError):
            assert err.value.status == grpclib.Status.INVALID_ARGUMENT and "node" in err.value.message
    assert "first request has no node" in caplog.text
    assert not srv.server.connections
    async with AdsClient("127.0.0.1", srv.xds_port, "fine") as c:  # the server is unharmed
        await c.send(res.CLUSTER)
        assert names(await c.recv()) == ["a"]


async def test_node_selector_and_unknown_type_and_garbage_nack(srv):
    async with AdsClient("127.0.0.1", srv.xds_port, "n1", cluster="special-svc") as c:
        await c.send("type.googleapis.com/does.not.Exist")
        await c.send(res.CLUSTER)
        cds = await c.recv()  # the unknown type got no answer, the stream goes on
        assert cds.type_url == res.CLUSTER and names(cds) == ["a", "only-special"]
        await c.send(res.CLUSTER, nonce=cds.nonce, error=Status(code=999, message="\x00\xff garbage" * 500))
        await c.send(res.LISTENER)
        lds = await c.recv()
        assert names(lds) == ["l"]
        conn = next(iter(srv.server.connections.values()))
        err = conn.state.types[res.CLUSTER].last_error
        assert "garbage" in err and len(err) < 2100 and err.isprintable()
    async with AdsClient("127.0.0.1", srv.xds_port, "n2", cluster="other") as c:
        await c.send(res.CLUSTER)
        assert names(await c.recv()) == ["a"]


async def test_many_streams_share_one_encoding_and_get_pushes(srv, config_dir):
    clients = [AdsClient("127.0.0.1", srv.xds_port, f"node-{i}") for i in range(5)]
    for c in clients:
        await c.__aenter__()
    try:
        for c in clients:
            await c.send(res.CLUSTER)
        first = [await c.recv() for c in clients]
        assert len({r.version_info for r in first}) == 1
        snaps = {id(srv.server.cache.get(f"node-{i}")) for i in range(5)}
        assert len(snaps) == 1  # one snapshot object (and its encodings) for identical configs
        for c in clients:
            await c.ack(res.CLUSTER)
        config_dir.write("all.yaml", [cluster("a", 1), cluster("b", 1), listener("l", 10000, "r"),
                                      route_config("r", [route("/", "b")])])
        pushed = await asyncio.gather(*(c.recv(10) for c in clients))
        assert all(names(p) == ["a", "b"] for p in pushed)
        for c in clients:
            await c.ack(res.CLUSTER)
        await asyncio.sleep(0.2)
        metrics = (await _get(srv, "/metrics"))
        assert 'pilot_xds{kind="sotw"} 5.0' in metrics
        assert "pilot_proxy_convergence_time_count" in metrics
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


async def test_sds_secret_served(config_dir, srv):
    secret = {"@type": res.SECRET, "name": "token",
              "generic_secret": {"secret": {"inline_string": "s3cr3t"}}}
    config_dir.write("secrets.yaml", [secret])
    for _ in range(100):  # the reload is asynchronous
        if "secrets.yaml" in srv.server.sources[0].status()["files"]:
            break
        await asyncio.sleep(0.05)
    async with AdsClient("127.0.0.1", srv.xds_port, "s1") as c:
        await c.send(res.SECRET, ["token"])
        r = await c.recv()
        assert r.type_url == res.SECRET
        (got,) = [a.unpack() for a in r.resources]
        assert got.name == "token" and got.generic_secret.secret.inline_string == "s3cr3t"


async def test_delta_stream_over_grpc(srv):
    async with AdsClient("127.0.0.1", srv.xds_port, "d1", delta=True) as c:
        await c.send(res.CLUSTER)
        d = await c.recv()
        assert sorted(r.name for r in d.resources) == ["a"]
        await c.send(res.ROUTE, ["r"])
        with pytest.raises(asyncio.TimeoutError):
            await c.recv(0.3)  # routes wait until the clusters are answered
        await c.ack(res.CLUSTER)
        rds = await c.recv()
        assert [r.name for r in rds.resources] == ["r"]
        await c.ack(res.ROUTE)
        with pytest.raises(asyncio.TimeoutError):
            await c.recv(0.3)  # nothing more to say


async def _get(srv, path):
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{srv.admin_port}{path}") as r:
        return await r.text()
