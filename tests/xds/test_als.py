"""Envoy's responses reach the kernel's outlier detector over gRPC ALS (NAME=odown).

A real Envoy with the access logger the residual adds for clusters the kernel
owns (fastpath.residual_outlier.als_logger: no batching) sends each response
to fastpath.als.AccessLogService; each observation is (cluster, upstream host,
status), in the order Envoy answered, and arrives a few ms after the client
got the response (printed). Entries without an upstream host (Envoy's own
503 "no healthy upstream") are not observations.
"""

from __future__ import annotations

import statistics
import time

import pytest
from aiohttp import web
from grpclib.server import Server

from fastpath import residual_outlier as ro
from fastpath.als import AccessLogService
from xds_server.envoyproc import Envoy

from .conftest import http_get, wait_for
from .helpers import free_port

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def bootstrap(als_port: int, app_port: int, lport: int, admin: int) -> dict:
    def static(name: str, port: int, h2: bool = False) -> dict:
        c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                              "port_value": port}}}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    log = ro.als_logger()
    cfg = log["typedConfig"]["commonConfig"]
    als = {"name": log["name"], "typed_config": {
        "@type": log["typedConfig"]["@type"],
        "common_config": {"log_name": cfg["logName"], "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": ro.ALS_CLUSTER}},
                          "buffer_size_bytes": cfg["bufferSizeBytes"],
                          "buffer_flush_interval": cfg["bufferFlushInterval"]}}}
    routes = [{"match": {"prefix": "/none"}, "route": {"cluster": "empty"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]
    empty = {"name": "empty", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "empty", "endpoints": []}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "node": {"id": "sidecar~127.0.0.1~als-0.t~t.svc.cluster.local", "cluster": "t"},
        "static_resources": {
            "clusters": [static(ro.ALS_CLUSTER, als_port, h2=True), static("c", app_port), empty],
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                                      "port_value": lport}},
                           "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                               "@type": HCM, "stat_prefix": "l", "access_log": [als],
                               "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"],
                                                                   "routes": routes}]},
                               "http_filters": [{"name": "router",
                                                 "typed_config": {"@type": ROUTER}}]}}]}]}]}}


@pytest.mark.envoy
async def test_envoy_responses_reach_the_sink_in_order(envoy_bin):
    got: list[tuple[float, str, list]] = []
    svc = AccessLogService(lambda node, obs: got.append((time.monotonic(), node, obs)))
    server = Server([svc])
    als_port, lport, admin = free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=int(request.path.rsplit("/", 1)[-1]), text="x")

    app = web.Application()
    app.router.add_get("/s/{code}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    app_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    envoy = Envoy(bootstrap(als_port, app_port, lport, admin), admin, binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/s/200"))[0] == 200

        await wait_for(up, 20)
        await wait_for(lambda: _true(bool(got)), 10)
        got.clear()
        codes = [500, 200, 503, 502, 200, 500, 404, 504] * 3
        done = []
        for c in codes:
            assert (await http_get(lport, f"/s/{c}"))[0] == c
            done.append(time.monotonic())
        assert (await http_get(lport, "/none"))[0] == 503  # no upstream host: not observed
        await wait_for(lambda: _true(sum(len(o) for _, _, o in got) >= len(codes)), 10)
        obs = [o for _, _, batch in got for o in batch]
        assert [s for _, _, s in obs] == codes, obs
        assert {(c, h) for c, h, _ in obs} == {("c", f"127.0.0.1:{app_port}")}
        assert {n for _, n, _ in got} == {"sidecar~127.0.0.1~als-0.t~t.svc.cluster.local"}
        lags = [t - d for (t, _, _), d in zip(got, done, strict=False)] if \
            len(got) == len(codes) else []
        print(f"ALS: {len(got)} messages for {len(codes)} responses; lag after the client "
              f"got the response, ms: median {statistics.median(lags) * 1000:.2f} "
              f"max {max(lags) * 1000:.2f}" if lags else f"ALS batches: {len(got)}")
    finally:
        envoy.stop()
        await runner.cleanup()
        server.close()
        await server.wait_closed()


async def _true(v: bool) -> bool:
    return v
