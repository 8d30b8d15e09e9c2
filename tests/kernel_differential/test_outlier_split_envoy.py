"""split_external_local_origin_errors: the kernel's detector against the real
Envoy's, request by request (NAME=odfix).

One real Envoy with two clusters whose outlier_detection is Cilium's
(`split_external_local_origin_errors: true`,
`consecutive_local_origin_failure: 2`; `consecutive_5xx` 3): `c` to an app
that answers by path (a 500, or late: the route's per-try timeout), `dead`
to a closed port (a connect failure each); and `p` to the same app without
split. After each request the test reads Envoy's own ejection stats, and the
kernel's detector (dp_outlier.h, in a datapath module compiled with
-DDP_OUTLIER=1, nothing attached) counts the same attempts as the agent does
on Envoy's path: Envoy's upstream access log (fastpath.als) ->
OutlierKeeper.count_envoy -> dp_od_ops. Both must eject after the same
request: without split a timeout's 504 is the third 5xx (`p`); with split
the external counter ignores the timeouts between the 500s, two sequential
timeouts never reach the local threshold (each attempt's connection zeroes
it first), two connect failures do. The kernel path's own events (sk_msg's
send zeroes, the agent's timeout counts) use the same ops:
tests/fastpath_unit/test_agent_outlier.py.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from grpclib.server import Server

from benchmarks.als_cost import sidecar_bootstrap
from fastpath import loader
from fastpath.agent_outlier import OutlierKeeper
from fastpath.als import AccessLogService
from fastpath.classify import classify_cluster
from fastpath.plan import KernelPlan
from tests.support.als import stop_all, true
from tests.xds.conftest import http_get, wait_for
from tests.xds.helpers import free_port
from xds_server.envoyproc import Envoy

pytestmark = [pytest.mark.envoy, pytest.mark.kernel]

CILIUM = {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
          "consecutive_5xx": 3, "max_ejection_percent": 100, "interval": "60s",
          "base_ejection_time": "60s"}
CILIUM_JSON = {"splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailure": 2,
               "consecutive5xx": 3, "maxEjectionPercent": 100, "interval": "60s",
               "baseEjectionTime": "60s"}
# request path -> what Envoy's detector gets; expected: ejected after it (Envoy and kernel)
SCRIPT = [("p", "/p/s/500", False), ("p", "/p/s/500", False),
          ("p", "/p/slow", True),  # without split: the timeout's 504 is the third 5xx
          ("c", "/s/500", False), ("c", "/s/500", False),
          ("c", "/slow", False),  # connected, then timed out: local 1, not a third 5xx
          ("c", "/slow", False),  # connected (local 0), timed out: local 1 again
          ("c", "/s/500", True),  # the third 500 in a row: consecutive_5xx
          ("dead", "/dead/a", False),  # no connection: local 1
          ("dead", "/dead/b", True)]  # local 2: consecutive_local_origin_failure


async def _app() -> tuple[web.AppRunner, int]:
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="x")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/s/{code}", status)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def _bootstrap(als_port: int, app: int, dead: int, lport: int, admin: int) -> dict[str, Any]:
    boot = sidecar_bootstrap(als_port, app, lport, admin)
    clusters = boot["static_resources"]["clusters"]
    c = next(x for x in clusters if x["name"] == "c")
    c["outlier_detection"] = dict(CILIUM)
    d = {**c, "name": "dead", "outlier_detection": dict(CILIUM),
         "load_assignment": {"cluster_name": "dead", "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": dead}}}}]}]}}
    plain = {k: v for k, v in CILIUM.items() if "local" not in k}
    p = {**c, "name": "p", "outlier_detection": plain,
         "load_assignment": {**c["load_assignment"], "cluster_name": "p"}}
    clusters += [d, p]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    per_try = {"timeout": "5s", "retry_policy": {"per_try_timeout": "0.2s"}}
    hcm["route_config"]["virtual_hosts"][0]["routes"][:0] = [
        {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
        {"match": {"prefix": "/slow"}, "route": {"cluster": "c", **per_try}},
        {"match": {"prefix": "/p/slow"}, "route": {"cluster": "p", "prefix_rewrite": "/slow",
                                                   **per_try}},
        {"match": {"prefix": "/p/"}, "route": {"cluster": "p", "prefix_rewrite": "/"}}]
    return boot


def _keeper(app: int, dead: int) -> OutlierKeeper:
    """The agent's half over a fresh datapath module, both clusters classified
    from the same outlier_detection (KERNEL: fastpath.classify)."""
    bpf = loader.compile_module(loader.module_text(), ("-DDP_OUTLIER=1",), instance="odfix-unit")
    for name in ("dp_odc", "dp_odd", "dp_odh", "dp_peer"):
        bpf[name].clear()
    plan_clusters = []
    plain = {k: v for k, v in CILIUM_JSON.items() if "Local" not in k}
    for name, port, od in (("c", app, CILIUM_JSON), ("dead", dead, CILIUM_JSON), ("p", app, plain)):
        cl = classify_cluster({"name": name, "type": "STATIC", "lbPolicy": "ROUND_ROBIN",
                               "outlierDetection": od, "loadAssignment": {
                                   "clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {
                                       "address": {"socketAddress": {"address": "127.0.0.1",
                                                                     "portValue": port}}}}]}]}}, {})
        assert cl.outlier is not None and cl.outlier.split == (name != "p"), cl.reason
        plan_clusters.append(cl)
    k = OutlierKeeper(SimpleNamespace(bpf=bpf))
    sp = SimpleNamespace(cluster_ids={"c": 0, "dead": 1, "p": 2}, no_healthy={})
    k.program(KernelPlan("n", "1", (), tuple(plan_clusters)), sp, 0, lambda cl: list(cl.endpoints), {})
    k.owned = frozenset({"c", "dead", "p"})  # STATIC clusters: owned here as EDS ones would be
    return k


def _kernel_ejected(k: OutlierKeeper, cluster: str) -> bool:
    d = k.dets[cluster]
    return any(k.dp.bpf["dp_odh"][ct.c_uint32(s)].ejected for _h, s in d.live_slots())


async def _envoy_ejected(admin: int, cluster: str) -> bool:
    body = (await http_get(admin, f"/stats?filter=^cluster\\.{cluster}\\.outlier_detection"
                                  "\\.ejections_enforced_total$"))[1]
    return int(body.split(":")[1]) > 0


async def test_split_ejections_as_in_envoy(kernel: None, envoy_bin: str) -> None:
    got: list[tuple[str, str, int]] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs))
    server = Server([svc])
    als_port, lport, admin, dead = free_port(), free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)
    runner, app = await _app()
    envoy = Envoy(_bootstrap(als_port, app, dead, lport, admin), admin, binary=envoy_bin).start()
    k = _keeper(app, dead)
    try:
        async def up() -> bool:
            return (await http_get(lport, "/s/200"))[0] == 200

        await wait_for(up, 20)
        await wait_for(lambda: true(bool(got)), 10)
        seen, rows = len(got), []
        for cluster, path, want in SCRIPT:
            await http_get(lport, path)
            await wait_for(lambda n=seen: true(len(got) > n), 10)  # this attempt's entry
            k.count_envoy(got[seen:])
            seen = len(got)
            k.service()
            rows.append((path, await _envoy_ejected(admin, cluster), _kernel_ejected(k, cluster), want))
        print("\n".join(f"{p:8} envoy {e!s:5} kernel {kk!s:5}" for p, e, kk, _ in rows))
        assert [(e, kk) for _, e, kk, _ in rows] == [(w, w) for *_, w in rows], rows
        kinds = [int(k.dp.bpf["dp_odh"][ct.c_uint32(s)].kind)
                 for c in ("p", "c", "dead") for _h, s in k.dets[c].live_slots()]
        assert kinds == [1, 1, 3]  # consecutive 5xx (twice), local origin
    finally:
        await stop_all(envoy, server, runner)

