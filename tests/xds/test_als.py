"""Envoy's responses reach the kernel's outlier detector over gRPC ALS (NAME=odown).

A real Envoy with the access logger the residual adds for clusters the kernel
owns (fastpath.residual_outlier.als_logger: batches of at most 10 ms) sends
each response to fastpath.als.AccessLogService; each observation is
(cluster, upstream host, status), in the order Envoy answered, and arrives
at most ~10 ms after the client got the response (printed). Entries without an upstream host (Envoy's own
503 "no healthy upstream") are not observations.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import socket
import statistics
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from grpclib.server import Server

from benchmarks.als_cost import round_order, sidecar_bootstrap
from fastpath import residual_outlier as ro
from fastpath.als import AccessLogService
from fastpath.outlier import AS_STATUS, LOCAL_CONNECT_FAILED, LOCAL_TIMEOUT, LOCAL_TIMEOUT_ALT
from tests.support.als import stop_all, true
from xds_server.envoyproc import Envoy

from .conftest import http_get, wait_for
from .helpers import free_port


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
    envoy = Envoy(sidecar_bootstrap(als_port, app_port, lport, admin), admin,
                  binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/s/200"))[0] == 200

        await wait_for(up, 20)
        await wait_for(lambda: true(bool(got)), 10)
        got.clear()
        codes = [500, 200, 503, 502, 200, 500, 404, 504] * 3
        done = []
        for c in codes:
            assert (await http_get(lport, f"/s/{c}"))[0] == c
            done.append(time.monotonic())
        assert (await http_get(lport, "/none"))[0] == 503  # no upstream host: not observed
        await wait_for(lambda: true(sum(len(o) for _, _, o in got) >= len(codes)), 10)
        obs = [o for _, _, batch in got for o in batch]
        assert [s for _, _, s in obs] == codes, obs
        assert {(c, h) for c, h, _ in obs} == {("c", f"127.0.0.1:{app_port}")}
        assert {n for _, n, _ in got} == {"sidecar~127.0.0.1~als-0.t~t.svc.cluster.local"}
        at = [t for t, _, batch in got for _ in batch]
        lags = sorted(t - d for t, d in zip(at, done, strict=True))
        print(f"ALS: {len(got)} messages for {len(codes)} responses; lag after the client "
              f"got the response, ms: median {statistics.median(lags) * 1000:.2f} "
              f"max {lags[-1] * 1000:.2f}")
    finally:
        await stop_all(envoy, server, runner)



async def _site(status: int) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=status, text="x")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


ISTIO_RETRY = {  # istiod's default route retry policy (2 retries, 503 on another host)
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "retriable_status_codes": [503], "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 5}


@pytest.mark.envoy
async def test_retried_503_is_counted_for_its_host(envoy_bin):
    """Envoy's detector counts every upstream attempt; so does the router's
    upstream_log: a 503 that Istio's retry policy retries on the other host
    (the client gets that host's 200) is observed for the host that answered
    503, once per attempt (Envoy's own upstream_rq_retry count). The cluster
    has an alt_stat_name: the entries name the cluster itself all the same."""
    got: list[tuple[str, str, int]] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs))
    server = Server([svc])
    als_port, lport, admin = free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)
    (bad_run, bad), (good_run, good) = await _site(503), await _site(200)
    boot = sidecar_bootstrap(als_port, bad, lport, admin)
    c = next(x for x in boot["static_resources"]["clusters"] if x["name"] == "c")
    c["alt_stat_name"] = "c_stats"  # entries still name the cluster (Envoy 1.40)
    c["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": good}}}})
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][-1]["route"]["retry_policy"] = ISTIO_RETRY
    envoy = Envoy(boot, admin, binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/warm"))[0] == 200

        await wait_for(up, 20)
        n = 12
        statuses = [(await http_get(lport, f"/r{i}"))[0] for i in range(n)]
        assert statuses == [200] * n  # every 503 retried on the good host
        stats = await http_get(admin, "/stats?filter=^cluster\\.c_stats\\.upstream_rq_retry$")
        retries = int(stats[1].split(":")[1])
        assert retries >= 2, stats
        want = retries + n + 1  # each retry's 503 and every 200 (the warm-up's too)
        await wait_for(lambda: true(len(got) >= want), 10)
        bad_obs = [st for cl, h, st in got if h == f"127.0.0.1:{bad}"]
        assert bad_obs == [503] * retries, got
        assert {st for _, h, st in got if h == f"127.0.0.1:{good}"} == {200}
        assert {cl for cl, _, _ in got} == {"c"}
    finally:
        await stop_all(envoy, server, bad_run, good_run)


def test_wire_reader_matches_betterproto() -> None:
    """fastpath.als reads the four fields it needs from the wire bytes as
    betterproto2 would; an entry without an upstream host or status is skipped."""
    from envoy_data_plane.envoy.config.core.v3 import Address, Node, SocketAddress
    from envoy_data_plane.envoy.data.accesslog.v3 import (
        AccessLogCommon,
        HttpAccessLogEntry,
        HttpResponseProperties,
        ResponseFlags,
    )
    from envoy_data_plane.envoy.service.accesslog.v3 import (
        StreamAccessLogsMessage,
        StreamAccessLogsMessageHttpAccessLogEntries,
        StreamAccessLogsMessageIdentifier,
    )

    from fastpath.als import observations

    def entry(cluster: str, host: str | None, code: int | None) -> HttpAccessLogEntry:
        cp = AccessLogCommon(upstream_cluster=cluster, route_name="r",
                             downstream_remote_address=Address(socket_address=SocketAddress(
                                 address="127.0.0.9", port_value=5)))
        if host:
            cp.upstream_remote_address = Address(socket_address=SocketAddress(
                address=host, port_value=9000))
        return HttpAccessLogEntry(common_properties=cp,
                                  response=HttpResponseProperties(response_code=code))

    msg = StreamAccessLogsMessage(
        identifier=StreamAccessLogsMessageIdentifier(node=Node(id="sidecar~x", cluster="c"),
                                                     log_name="l"),
        http_logs=StreamAccessLogsMessageHttpAccessLogEntries(log_entry=[
            entry("od", "198.18.0.3", 503), entry("od", None, 503), entry("od", "198.18.0.4", None),
            entry("od", "198.18.0.4", 200)]))
    timed_out = entry("od", "198.18.0.5", None)  # a per-try timeout: no status, flag UT
    timed_out.common_properties.response_flags = ResponseFlags(upstream_request_timeout=True)
    overflow = entry("od", "198.18.0.6", None)  # circuit breaker: Envoy's detector ignores it
    overflow.common_properties.response_flags = ResponseFlags(upstream_overflow=True)
    flagged = StreamAccessLogsMessage(http_logs=StreamAccessLogsMessageHttpAccessLogEntries(
        log_entry=[timed_out, overflow]))
    assert observations(bytes(flagged))[2] == [("od", "198.18.0.5:9000", LOCAL_TIMEOUT)]
    assert observations(bytes(msg)) == ("sidecar~x", "l", [("od", "198.18.0.3:9000", 503),
                                                           ("od", "198.18.0.4:9000", 200)])
    msg.identifier = None
    raw = bytes(msg)
    t0 = time.perf_counter()
    for _ in range(200):
        node, name, obs = observations(raw)
    per = (time.perf_counter() - t0) / 800 * 1e6
    assert node == name == "" and len(obs) == 2
    print(f"ALS wire read: {per:.1f} µs per entry")


def test_streams_are_accepted_only_from_the_nodes_ip_with_our_log_name() -> None:
    """Anything reaching the ADS port could send entries naming any node: a
    stream counts only with ALS_LOG_NAME and from the IP its node id names."""
    from fastpath.als import refusal
    from fastpath.residual_outlier import ALS_LOG_NAME

    node = "sidecar~198.18.0.5~a-0.t~t.svc.cluster.local"
    assert refusal(node, ALS_LOG_NAME, "198.18.0.5") == ""
    assert refusal(node, ALS_LOG_NAME, "::ffff:198.18.0.5") == ""  # a dual-stack socket
    assert "comes from 198.18.0.6" in refusal(node, ALS_LOG_NAME, "198.18.0.6")
    assert "log name 'other'" in refusal(node, "other", "198.18.0.5")
    assert "names no IP" in refusal("router~x~y", ALS_LOG_NAME, "198.18.0.5")
    assert "names no IP" in refusal("sidecar-only", ALS_LOG_NAME, "198.18.0.5")


@pytest.mark.envoy
@pytest.mark.parametrize(("ip", "accepted"), [("198.18.0.77", False), ("127.0.0.1", True)])
async def test_a_foreign_stream_is_refused_and_a_node_goes_live_and_back(envoy_bin, ip, accepted,
                                                                      caplog):
    """The real Envoy's stream from 127.0.0.1 naming 198.18.0.77 is refused
    (nothing counted, no live node; logged once however often Envoy
    reopens it); the same Envoy naming 127.0.0.1 goes
    live at its first entry and back when it stops (on_stream)."""
    got: list[Any] = []
    events: list[tuple[str, bool]] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs),
                           lambda node, live: events.append((node, live)))
    server = Server([svc])
    als_port, lport, admin = free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)
    runner, app_port = await _site(200)
    boot = sidecar_bootstrap(als_port, app_port, lport, admin)
    node = f"sidecar~{ip}~als-0.t~t.svc.cluster.local"
    boot["node"]["id"] = node
    envoy = Envoy(boot, admin, binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/x"))[0] == 200

        await wait_for(up, 20)
        if accepted:
            await wait_for(lambda: true(bool(got)), 10)
            assert events == [(node, True)] and svc.live == {node: 1}
        else:
            for i in range(3):  # Envoy reopens the refused stream at its next flushes
                await http_get(lport, f"/x{i}")
                await asyncio.sleep(0.05)
            await wait_for(lambda: true(svc.refused >= 2), 10)
            assert not got and not events and not svc.live
            said = [r for r in caplog.records if "refused" in r.getMessage()]
            assert len(said) == 1, said  # once per (node, reason), not per reopening
    finally:
        envoy.stop()
        await runner.cleanup()
    if accepted:
        await wait_for(lambda: true(events[-1:] == [(node, False)]), 10)
        assert not svc.live
    server.close()
    await server.wait_closed()


@pytest.mark.envoy
async def test_a_connect_failure_counts_as_envoys_detector_counts_it(envoy_bin):
    """An attempt to a closed port has no response status: Envoy's detector
    counts it as a 503 (consecutive_5xx 1: one detection in its stats), and
    the observation says LOCAL_CONNECT_FAILED for that host (ResponseFlags
    upstream_connection_failure; the keeper counts it as that 503 without
    split); the retry's 200 on the other host too."""
    got: list[tuple[str, str, int]] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs))
    server = Server([svc])
    als_port, lport, admin, closed = free_port(), free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)
    runner, good = await _site(200)
    boot = sidecar_bootstrap(als_port, closed, lport, admin)
    c = next(x for x in boot["static_resources"]["clusters"] if x["name"] == "c")
    c["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": good}}}})
    c["outlier_detection"] = {"consecutive_5xx": 1, "interval": "60s"}
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][-1]["route"]["retry_policy"] = ISTIO_RETRY
    envoy = Envoy(boot, admin, binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/x"))[0] == 200

        await wait_for(up, 20)
        for i in range(4):
            assert (await http_get(lport, f"/r{i}"))[0] == 200
        stats = (await http_get(admin, "/stats?filter=^cluster\\.c\\.outlier_detection"))[1]
        detected = int(stats.split("ejections_detected_consecutive_5xx: ")[1].split()[0])
        assert detected >= 1, stats  # Envoy's detector counted the connect failure
        await wait_for(lambda: true(any(h.endswith(f":{closed}") for _, h, _ in got)), 10)
        assert {st for _, h, st in got if h.endswith(f":{closed}")} == {LOCAL_CONNECT_FAILED}, got
        assert {st for _, h, st in got if h.endswith(f":{good}")} == {200}, got
    finally:
        await stop_all(envoy, server, runner)


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
SEEN = web.AppKey("seen", list[str])  # the paths a _slow_site got, in order


async def _slow_site(delay: float) -> tuple[web.AppRunner, int]:
    """An app that answers after `delay` s; on /stall its headers at once, the
    body after `delay` s; on /fast at once. `runner.app[SEEN]`: the paths it
    got, in order (not /fast)."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        await asyncio.sleep(delay)
        return web.Response(status=200, text="late")

    async def stall(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(status=200)
        r.content_length = 100
        await r.prepare(request)
        await r.write(b"x")
        await asyncio.sleep(delay)
        return r

    async def fast(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text="fast")

    app = web.Application()
    app[SEEN] = seen
    app.router.add_get("/stall", stall)
    app.router.add_get("/fast", fast)
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def _detected(admin: int, cluster: str) -> int:
    """Envoy's detections of `cluster` (with consecutive_5xx 1: the 5xx it counted,
    one request at a time)."""
    return await _stat(admin, cluster, "outlier_detection.ejections_detected_consecutive_5xx")


async def _stat(admin: int, cluster: str, name: str) -> int:
    """Envoy's counter cluster.`cluster`.`name`."""
    stat = await http_get(admin, f"/stats?filter=^cluster\\.{cluster}\\.{re.escape(name)}$")
    return int(stat[1].split(":")[1])


@pytest.mark.envoy
async def test_timeouts_as_the_access_log_carries_them(envoy_bin):
    """An upstream that answers after the timeout; after each request Envoy's
    detector (enforcing 0: never ejected) has counted a 504 as many times as
    the observations say (its detection stat, threshold 1). A per-try timeout
    and a per-try idle timeout mark the attempt's own entry (flags UT, resp.
    stream idle timeout): LOCAL_TIMEOUT (the keeper counts it as that 504
    without split). A route timeout (Filter::onResponseTimeout) resets the
    attempt: its entry has no status and no flag (as a downstream reset's);
    the HCM's UT-filtered entry of the request pairs with it: LOCAL_TIMEOUT,
    once; with hedging (`/hedge`) only the attempt its soft per-try timeout
    had not counted; four at once, four. Not counted, as Envoy does not: a route timeout in a retry's
    backoff (`/bo`: the per-try timeout before it counts, once), after the
    upstream's headers (`/stall`: its 200 counts; the client gets a reset),
    while the attempt's connect is pending (`/pend`: a host whose accept
    queue is full; its entry names the host but has no local address), a
    downstream reset. Then, on a second listener, requests without an
    x-request-id and the alt-response header (_without_request_id_and_alt)."""
    got: list[tuple[str, str, int]] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs))
    server = Server([svc])
    als_port, lport, admin = free_port(), free_port(), free_port()
    await server.start("127.0.0.1", als_port)
    runner, slow = await _slow_site(1.5)
    boot = sidecar_bootstrap(als_port, slow, lport, admin)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    per_try = {"per_try_timeout": "0.2s", "retry_on": "5xx", "num_retries": 3}
    routes[:0] = [{"match": {"prefix": "/rt"}, "route": {"cluster": "c", "timeout": "0.3s"}},
                  {"match": {"prefix": "/stall"}, "route": {"cluster": "c", "timeout": "0.3s"}},
                  {"match": {"prefix": "/pt"}, "route": {"cluster": "c", "timeout": "5s",
                                                         "retry_policy": {"per_try_timeout": "0.3s"}}},
                  {"match": {"prefix": "/pi"}, "route": {"cluster": "c", "timeout": "5s",
                                                         "retry_policy": {"per_try_idle_timeout": "0.3s"}}},
                  {"match": {"prefix": "/mix"}, "route": {"cluster": "c", "timeout": "0.5s",
                                                          "retry_policy": per_try}},
                  {"match": {"prefix": "/hedge"}, "route": {"cluster": "c", "timeout": "0.5s",
                                                            "hedge_policy": {"hedge_on_per_try_timeout": True},
                                                            "retry_policy": {**per_try, "num_retries": 2}}},
                  {"match": {"prefix": "/bo"}, "route": {"cluster": "c", "timeout": "0.3s",
                                                         "retry_policy": {**per_try, "retry_back_off": {
                                                             "base_interval": "1s", "max_interval": "1s"}}}}]
    c = next(x for x in boot["static_resources"]["clusters"] if x["name"] == "c")
    c["outlier_detection"] = {"consecutive_5xx": 1, "enforcing_consecutive_5xx": 0, "interval": "60s"}
    full, queued = _full_backlog()
    boot["static_resources"]["clusters"].append({**c, "name": "pend", "load_assignment": {
        "cluster_name": "pend", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": full.getsockname()[1]}}}}]}]}})
    routes.insert(0, {"match": {"prefix": "/pend"}, "route": {"cluster": "pend", "timeout": "0.3s"}})
    lport2, lport3 = free_port(), free_port()
    _add_internal_listener(boot, lport2, lport3)
    envoy = Envoy(boot, admin, binary=envoy_bin).start()
    try:
        async def up() -> bool:
            return (await http_get(lport, "/none"))[0] == 503

        await wait_for(up, 20)
        assert (await http_get(lport, "/pend"))[0] == 504
        await asyncio.sleep(0.2)
        assert not got, got  # Envoy's detector had no host for it: nothing counted
        assert await _detected(admin, "pend") == 0
        t = ("c", f"127.0.0.1:{slow}", LOCAL_TIMEOUT)
        cases = (("/rt", 504, [t]), ("/pt", 504, [t]), ("/pi", 504, [t]),
                 ("/mix", 504, [t, t, t]),  # per-try, per-try, then the route's on the third
                 # hedged: two soft per-try timeouts (their attempts flagged UT when the
                 # route timeout resets all three), the route's on the third only
                 ("/hedge", 504, [t, t, t]),
                 ("/bo", 504, [t]), ("/stall", 0, [("c", t[1], 200)]), ("/reset", 0, []))
        detected = 0
        for path, status, want in cases:
            got.clear()
            if path == "/reset":  # the client leaves before the answer
                await _leave_early(lport, 0.3)
            else:
                assert (await http_get(lport, path))[0] == status, path
            await asyncio.sleep(0.2)  # the ALS flushes every 10 ms
            if path == "/bo" and runner.app[SEEN].count("/bo") == 2:
                # the backoff is random in [0, 1 s): a retry started before the route
                # timeout (about 1 run in 10), which then reset it: Envoy counts it too
                want = [t, t]
            assert got == want, (path, got)
            # Envoy's own detector counted a 504 for each LOCAL_TIMEOUT, nothing else
            detected += sum(1 for o in want if o[2] == LOCAL_TIMEOUT)
            assert await _detected(admin, "c") == detected, path
        # route timeouts at once: their entries interleave on the workers' streams.
        # Envoy's detection stat cannot count them (the host's count reaches 1..4
        # before the main thread resets it: one detection); its route-timeout stat can
        got.clear()
        before = await _stat(admin, "c", "upstream_rq_timeout")
        answers = await asyncio.gather(*(http_get(lport, "/rt") for _ in range(4)))
        assert [a[0] for a in answers] == [504] * 4
        await asyncio.sleep(0.2)
        assert got == [t] * 4, got
        assert await _stat(admin, "c", "upstream_rq_timeout") == before + 4
        await _without_request_id_and_alt(lport, lport2, admin, got, t)
        await _alt_by_forwarded_for(lport3, got, ("c2", t[1], LOCAL_TIMEOUT))
        await _alt_state_keeps_one_upstream_pool(lport2, admin)
    finally:
        await stop_all(envoy, server, runner)
        for sock in (full, *queued):
            sock.close()


def _add_internal_listener(boot: dict[str, Any], port: int, port3: int) -> None:
    """A second listener on `port` whose HCM generates no x-request-id and
    takes 127.0.0.1 as internal (use_remote_address, internal_address_config:
    Envoy honours x-envoy-upstream-rq-timeout-alt-response only there), with
    the loggers (and the alt-response filter) the residual gives such an HCM
    (residual_outlier.hcm_with_als); `/pt` (per-try timeout 0.3 s) and `/pi`
    (per-try idle timeout 0.3 s) to `c2`, the rest to `c2` with a 0.3 s route
    timeout. `c2`: cluster `c`'s host, consecutive_5xx 2, not enforced. On
    `port3` the same HCM with use_remote_address false (`_alt_by_forwarded_for`)."""
    sr = boot["static_resources"]
    c2 = copy.deepcopy(next(x for x in sr["clusters"] if x["name"] == "c"))
    c2.update(name="c2", outlier_detection={"consecutive_5xx": 2, "enforcing_consecutive_5xx": 0,
                                            "interval": "60s"})
    c2["load_assignment"]["cluster_name"] = "c2"
    routes = [{"match": {"prefix": p}, "route": {"cluster": "c2", "timeout": "5s", "retry_policy": {k: "0.3s"}}}
              for p, k in (("/pt", "perTryTimeout"), ("/pi", "perTryIdleTimeout"))]
    hcm = {"@type": HCM_TYPE, "statPrefix": "l2", "generateRequestId": False, "useRemoteAddress": True,
           "internalAddressConfig": {"cidrRanges": [{"addressPrefix": "127.0.0.1", "prefixLen": 32}]},
           "routeConfig": {"virtualHosts": [{"name": "a", "domains": ["*"], "routes": [*routes, {
               "match": {"prefix": "/"}, "route": {"cluster": "c2", "timeout": "0.3s"}}]}]},
           "httpFilters": [{"name": "router", "typedConfig": {"@type": ro.ROUTER_TYPE}}]}
    assert ro.hcm_with_als(hcm) and len(hcm["httpFilters"]) == 2  # the alt-response filter
    sr["clusters"].append(c2)
    hcm3 = {**copy.deepcopy(hcm), "statPrefix": "l3", "useRemoteAddress": False}
    for name, at, conf in (("l2", port, hcm), ("l3", port3, hcm3)):
        sr["listeners"].append({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": at}},
                                "filter_chains": [{"filters": [{"name": "hcm", "typed_config": conf}]}]})


ALT = {"x-envoy-upstream-rq-timeout-alt-response": "1"}


async def _status_of(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{port}{path}", headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=3)) as r:
        return r.status


async def _without_request_id_and_alt(lport: int, lport2: int, admin: int, got: list[Any],
                                      t: tuple[str, str, int]) -> None:
    """Route timeouts of requests without an x-request-id (listener `lport2`)
    pair by their connections; x-envoy-upstream-rq-timeout-alt-response: from
    a client that is not internal (`lport`) Envoy strips it: 504, counted as
    any; honoured (`lport2`) the client gets 204 and Envoy's detector that 204
    for each timeout, route or per-try (a success: it ends a run of 5xx). After
    each request Envoy's detections of `c2` (consecutive_5xx 2) equal those
    of its rule over our observations (their status, outlier.AS_STATUS; a run
    of 2 detects and starts again)."""
    got.clear()
    before = await _detected(admin, "c")
    assert await _status_of(lport, "/rt", ALT) == 504
    await asyncio.sleep(0.2)
    assert got == [t] and await _detected(admin, "c") == before + 1, got
    t2 = ("c2", t[1], LOCAL_TIMEOUT)
    run = ours = 0
    for path, alt in (("/x", False), ("/x", True), ("/x", False), ("/pt", True), ("/x", False),
                      ("/pi", True), ("/pt", False), ("/x", False)):
        got.clear()
        assert await _status_of(lport2, path, ALT if alt else None) == (204 if alt else 504)
        await asyncio.sleep(0.2)
        assert got == [(*t2[:2], LOCAL_TIMEOUT_ALT if alt else LOCAL_TIMEOUT)], (path, alt, got)
        run = run + 1 if AS_STATUS[got[0][2]] >= 500 else 0
        ours, run = (ours + 1, 0) if run == 2 else (ours, run)
        assert await _detected(admin, "c2") == ours, (path, alt, ours)
    assert ours == 1  # the last two 504s; a 204 counted as 504 would have detected more
    got.clear()
    before = await _stat(admin, "c2", "upstream_rq_timeout")
    answers = await asyncio.gather(*(_status_of(lport2, "/x") for _ in range(4)))
    assert answers == [504] * 4
    await asyncio.sleep(0.2)
    assert got == [t2] * 4, got
    assert await _stat(admin, "c2", "upstream_rq_timeout") == before + 4


async def _alt_by_forwarded_for(port: int, got: list[Any], t2: tuple[str, str, int]) -> None:
    """The listener with use_remote_address false: Envoy takes a request as
    internal by its x-forwarded-for header (the client sends it), when that is
    one address in the ranges, not by the peer: with `x-forwarded-for: 127.0.0.1`
    the alt-response header is honoured (204) and logged (the filter state);
    without the header, or with two addresses (the last one 127.0.0.1), 504."""
    for xff, alt in (("127.0.0.1", True), (None, False), ("198.18.0.9, 127.0.0.1", False)):
        got.clear()
        headers = {**ALT, **({"x-forwarded-for": xff} if xff else {})}
        assert await _status_of(port, "/x", headers) == (204 if alt else 504), xff
        await asyncio.sleep(0.2)
        assert got == [(*t2[:2], LOCAL_TIMEOUT_ALT if alt else LOCAL_TIMEOUT)], (xff, got)


async def _alt_state_keeps_one_upstream_pool(port: int, admin: int) -> None:
    """The alt-response filter state (`envoy.string`, shared with the upstream
    ONCE) does not key Envoy's upstream connection pools: requests without it
    and with two values reuse one upstream connection (`envoy.hashable_string`
    there gave one connection per value: docs/fastpath.md)."""
    before = await _stat(admin, "c2", "upstream_cx_total")
    async with aiohttp.ClientSession() as s:
        for alt in (None, "1", "2", None, "1"):
            async with s.get(f"http://127.0.0.1:{port}/fast", headers=ALT | {
                    "x-envoy-upstream-rq-timeout-alt-response": alt} if alt else {},
                    timeout=aiohttp.ClientTimeout(total=3)) as r:
                assert r.status == 200 and await r.text() == "fast"
    assert await _stat(admin, "c2", "upstream_cx_total") - before <= 1


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket on 127.0.0.1 whose accept queue is full (and the
    sockets that fill it): a new connect to it stays pending, its SYNs dropped."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(full.getsockname())
        queued.append(s)
    time.sleep(0.2)  # their handshakes
    return full, queued


async def _leave_early(port: int, after: float) -> None:
    """A GET whose client closes its connection `after` s, before the answer."""
    _r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    await asyncio.sleep(after)
    w.close()
    await w.wait_closed()
    await asyncio.sleep(0.1)  # Envoy sees the close, resets the attempt and logs it


# ---- malformed input (no Envoy: the wire reader, and the servicer over a real gRPC stream) ----
def _msg(node: str = "sidecar~127.0.0.1~a-0.t~t.svc.cluster.local", log_name: str = "",
         entries: list[Any] | None = None) -> bytes:
    from envoy_data_plane.envoy.config.core.v3 import Node
    from envoy_data_plane.envoy.service.accesslog.v3 import (
        StreamAccessLogsMessage,
        StreamAccessLogsMessageHttpAccessLogEntries,
        StreamAccessLogsMessageIdentifier,
    )

    from fastpath.residual_outlier import ALS_LOG_NAME
    ident = StreamAccessLogsMessageIdentifier(node=Node(id=node), log_name=log_name or ALS_LOG_NAME)
    return bytes(StreamAccessLogsMessage(
        identifier=ident if node else None,
        http_logs=StreamAccessLogsMessageHttpAccessLogEntries(log_entry=entries or [])))


def _entry(host: str, port: int | None, named: str = "") -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
    from envoy_data_plane.envoy.data.accesslog.v3 import (
        AccessLogCommon,
        HttpAccessLogEntry,
        HttpResponseProperties,
    )
    sa = SocketAddress(address=host, port_value=port) if port is not None else \
        SocketAddress(address=host, named_port=named)
    return HttpAccessLogEntry(common_properties=AccessLogCommon(
        upstream_cluster="c", upstream_remote_address=Address(socket_address=sa)),
        response=HttpResponseProperties(response_code=503))


def _in_log(entry: bytes) -> bytes:
    """A StreamAccessLogsMessage whose http_logs hold this one entry's bytes (< 128)."""
    inner = b"\x0a" + bytes([len(entry)]) + entry
    return b"\x12" + bytes([len(inner)]) + inner


GOOD_ENTRY = bytes(_entry("198.18.0.3", 9000))
MALFORMED = {
    "truncated varint": b"\x08\x96",
    "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "wire type 3 (start group)": b"\x0b",
    "wire type 4 (end group)": b"\x0c",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "length past the buffer": b"\x0a\x05ab",
    "truncated fixed64": b"\x09\x01\x02\x03",
    "truncated fixed32": b"\x0d\x01",
    "huge field number, truncated": b"\xf8\xff\xff\xff\xff\xff\xff\xff\x7f",
    "malformed identifier": b"\x0a\x02\x0b\x00",
    "malformed log entry": b"\x12\x04\x0a\x02\x0f\x00",
    "malformed status deep down": _in_log(GOOD_ENTRY + b"\x22\x04\x0a\x02\x08\xff"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_bytes_are_a_decode_error_and_nothing_else(data: bytes) -> None:
    from fastpath.als import observations
    from xds_server.protocol.requests import DecodeError
    with pytest.raises(DecodeError):
        observations(data)


def test_random_bytes_never_raise_anything_but_decode_error() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fastpath.als import observations
    from xds_server.protocol.requests import DecodeError

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=64) | st.builds(lambda a, b: a + b, st.just(_msg()), st.binary(max_size=16)))
    def check(data: bytes) -> None:
        try:
            node, name, obs = observations(data)
        except DecodeError:
            return
        assert isinstance(node, str) and isinstance(name, str)
        assert all(isinstance(s, int) and s for _c, _h, s in obs)
    check()


def test_a_named_port_is_no_upstream_host() -> None:
    """A SocketAddress with named_port has no port_value: not recorded as ip:0."""
    from fastpath.als import observations
    got = observations(_msg(entries=[_entry("198.18.0.3", None, "http"), _entry("198.18.0.4", 80)]))
    assert got[2] == [("c", "198.18.0.4:80", 503)]


class _Raw:
    """A request message that is these bytes as they are (grpclib's client codec)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - grpclib's codec calls this name
        return self.data


async def _stream_of(port: int, *messages: bytes) -> None:
    """Send `messages` on one StreamAccessLogs stream from 127.0.0.1; GRPCError if refused."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from fastpath.als import PATH, RawMessage
    ch = Channel("127.0.0.1", port)
    try:
        async with ch.request(PATH, Cardinality.STREAM_UNARY, _Raw, RawMessage) as s:
            for m in messages:
                await s.send_message(_Raw(m))
            await s.end()
            await s.recv_message()
    finally:
        ch.close()


async def test_a_stream_whose_first_message_is_malformed_is_refused_and_later_ones_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """Before the identifier the peer is unknown: a malformed first message ends
    the stream (INVALID_ARGUMENT). On an accepted stream malformed messages are
    counted, logged once per stream, and the good ones still reach the sink."""
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError
    got: list[Any] = []
    svc = AccessLogService(lambda node, obs: got.extend(obs))
    server = Server([svc])
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        with pytest.raises(GRPCError) as refused:
            await _stream_of(port, MALFORMED["truncated varint"], _msg(entries=[_entry("198.18.0.3", 80)]))
        assert refused.value.status is Status.INVALID_ARGUMENT and svc.malformed == 1
        assert not got and not svc.live
        caplog.clear()
        entry = _msg(node="", entries=[_entry("198.18.0.3", 80)])
        await _stream_of(port, _msg(), *[MALFORMED["wire type 7"]] * 3, entry)
        assert svc.malformed == 4 and got == [("c", "198.18.0.3:80", 503)]
        said = [r for r in caplog.records if "malformed" in r.getMessage()]
        assert len(said) == 1, said
        assert not svc.live
    finally:
        server.close()
        await server.wait_closed()


async def test_a_raising_on_stream_leaves_the_live_count_balanced() -> None:
    """on_stream (the agent's) raised when the node went live: the stream is
    still taken back when it ends, so the node does not stay live forever."""
    calls: list[bool] = []

    def on_stream(_node: str, live: bool) -> None:
        calls.append(live)
        raise RuntimeError("agent busy")
    svc = AccessLogService(lambda node, obs: None, on_stream)
    server = Server([svc])
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        await _stream_of(port, _msg())
        assert calls == [True, False] and svc.live == {}
    finally:
        server.close()
        await server.wait_closed()


def test_the_cost_benchmark_alternates_its_order() -> None:
    """benchmarks.als_cost ran its variants in the same order every round: a bias the
    medians of the rounds' ratios kept (docs/fastpath.md, the UT logger's cost)."""
    v = ["no_als", "als", "als_router_only"]
    assert [round_order(v, n) for n in range(3)] == [v, v[::-1], v]
