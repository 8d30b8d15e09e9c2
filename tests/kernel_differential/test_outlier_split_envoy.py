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
it first), two connect failures do. A route timeout (NAME=odtimeout: the
HCM's UT entry paired with the attempt it reset, fastpath.als.RouteTimeouts)
counts as Envoy counts it: without split a 504 (`q`: ejected at the third
in a row, on both); with split a
local failure after the attempt's connection, so a connect failure right
after it is the second in a row (`t`: its app stops between the two).
The kernel path's own events (sk_msg's send zeroes, the agent's timeout
counts) use the same ops: tests/fastpath_unit/test_agent_outlier.py.
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
STOP = "stop t's app"
# request path -> what Envoy's detector gets; expected: ejected after it (Envoy and kernel)
SCRIPT = [("p", "/p/s/500", False), ("p", "/p/s/500", False),
          ("p", "/p/slow", True),  # without split: the timeout's 504 is the third 5xx
          ("c", "/s/500", False), ("c", "/s/500", False),
          ("c", "/slow", False),  # connected, then timed out: local 1, not a third 5xx
          ("c", "/slow", False),  # connected (local 0), timed out: local 1 again
          ("c", "/s/500", True),  # the third 500 in a row: consecutive_5xx
          ("dead", "/dead/a", False),  # no connection: local 1
          ("dead", "/dead/b", True),  # local 2: consecutive_local_origin_failure
          ("q", "/q/rt", False), ("q", "/q/rt", False),
          ("q", "/q/rt", True),  # without split: the third route timeout's 504 is the third 5xx
          ("t", "/t/s/200", False),  # connected: local 0
          ("t", "/t/rt", False),  # connected, route timeout: local 1
          ("t", STOP, False),  # t's app goes away
          ("t", "/t/x", True)]  # connect failure: local 2 (1 if the route timeout were lost)


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


def _bootstrap(als_port: int, ports: dict[str, int], lport: int, admin: int) -> dict[str, Any]:
    """Envoy with clusters c (split), dead (split), p and q (no split) and t
    (split), each on its app port in `ports` (dead's: closed)."""
    boot = sidecar_bootstrap(als_port, ports["c"], lport, admin)
    clusters = boot["static_resources"]["clusters"]
    c = next(x for x in clusters if x["name"] == "c")
    c["outlier_detection"] = dict(CILIUM)
    plain = {k: v for k, v in CILIUM.items() if "local" not in k}
    clusters += [_cluster(c, name, ports[name], od)
                 for name, od in (("dead", CILIUM), ("p", plain), ("q", plain), ("t", CILIUM))]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    per_try = {"timeout": "5s", "retry_policy": {"per_try_timeout": "0.2s"}}
    route_timeout = {"timeout": "0.2s", "prefix_rewrite": "/slow"}
    hcm["route_config"]["virtual_hosts"][0]["routes"][:0] = [
        {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
        {"match": {"prefix": "/slow"}, "route": {"cluster": "c", **per_try}},
        {"match": {"prefix": "/p/slow"}, "route": {"cluster": "p", "prefix_rewrite": "/slow",
                                                   **per_try}},
        {"match": {"prefix": "/p/"}, "route": {"cluster": "p", "prefix_rewrite": "/"}},
        *[r for name in "qt" for r in (
            {"match": {"prefix": f"/{name}/rt"}, "route": {"cluster": name, **route_timeout}},
            {"match": {"prefix": f"/{name}/"}, "route": {"cluster": name, "prefix_rewrite": "/"}})]]
    return boot


def _cluster(c: dict[str, Any], name: str, port: int, od: dict[str, Any]) -> dict[str, Any]:
    """A copy of cluster `c` named `name`, one endpoint 127.0.0.1:`port`, detector `od`."""
    return {**c, "name": name, "outlier_detection": dict(od),
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": port}}}}]}]}}


def _keeper(ports: dict[str, int]) -> OutlierKeeper:
    """The agent's half over a fresh datapath module, both clusters classified
    from the same outlier_detection (KERNEL: fastpath.classify)."""
    bpf = loader.compile_module(loader.module_text(), ("-DDP_OUTLIER=1",), instance="odfix-unit")
    for name in ("dp_odc", "dp_odd", "dp_odh", "dp_peer"):
        bpf[name].clear()
    plan_clusters = []
    plain = {k: v for k, v in CILIUM_JSON.items() if "Local" not in k}
    for name, od in (("c", CILIUM_JSON), ("dead", CILIUM_JSON), ("p", plain), ("q", plain),
                     ("t", CILIUM_JSON)):
        port = ports[name]
        cl = classify_cluster({"name": name, "type": "STATIC", "lbPolicy": "ROUND_ROBIN",
                               "outlierDetection": od, "loadAssignment": {
                                   "clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {
                                       "address": {"socketAddress": {"address": "127.0.0.1",
                                                                     "portValue": port}}}}]}]}}, {})
        assert cl.outlier is not None and cl.outlier.split == (od is CILIUM_JSON), cl.reason
        plan_clusters.append(cl)
    k = OutlierKeeper(SimpleNamespace(bpf=bpf))
    sp = SimpleNamespace(cluster_ids={c.name: i for i, c in enumerate(plan_clusters)}, no_healthy={})
    k.program(KernelPlan("n", "1", (), tuple(plan_clusters)), sp, 0, lambda cl: list(cl.endpoints), {})
    k.owned = frozenset(ports)  # STATIC clusters: owned here as EDS ones would be
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
    (runner, app), (t_runner, t_app) = await _app(), await _app()
    ports = {"c": app, "dead": dead, "p": app, "q": app, "t": t_app}
    envoy = Envoy(_bootstrap(als_port, ports, lport, admin), admin, binary=envoy_bin).start()
    k = _keeper(ports)
    try:
        async def up() -> bool:
            return (await http_get(lport, "/s/200"))[0] == 200

        await wait_for(up, 20)
        await wait_for(lambda: true(bool(got)), 10)
        seen, rows = len(got), []
        for cluster, path, want in SCRIPT:
            if path == STOP:
                await t_runner.cleanup()
                continue
            await http_get(lport, path)
            await wait_for(lambda n=seen: true(len(got) > n), 10)  # this attempt's entry
            k.count_envoy(got[seen:])
            seen = len(got)
            k.service()
            rows.append((path, await _envoy_ejected(admin, cluster), _kernel_ejected(k, cluster), want))
        print("\n".join(f"{p:8} envoy {e!s:5} kernel {kk!s:5}" for p, e, kk, _ in rows))
        assert [(e, kk) for _, e, kk, _ in rows] == [(w, w) for *_, w in rows], rows
        kinds = [int(k.dp.bpf["dp_odh"][ct.c_uint32(s)].kind)
                 for c in ("p", "c", "dead", "q", "t") for _h, s in k.dets[c].live_slots()]
        assert kinds == [1, 1, 3, 1, 3]  # consecutive 5xx (p, c, q), local origin (dead, t)
    finally:
        await stop_all(envoy, server, runner, t_runner)  # t's app may be stopped already

