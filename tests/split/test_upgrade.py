"""A route with upgrade_configs is KERNEL: Envoy uses the config only for
upgrade requests, and the kernel hands every one of those to Envoy.

Checked with the real Envoy on envoyproxy/examples websocket/envoy-ws-route.yaml
(a websocket route, then a direct response for the rest) plus a route without
upgrade config: every request the reference model decides in the kernel gets
from Envoy the model's answer (plain requests, `Connection: upgrade` alone,
`Upgrade` alone: Envoy treats them as plain requests); the ones that make the
upgrade config matter (websocket upgrade: upstream on /ws, 403 elsewhere) all
carry `Upgrade` and go to Envoy. tests/kernel_decide/test_upgrade.py runs the
plan in the kernel."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import KernelPlan, Verdict
from fastpath.reference import Request, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports, http_request
from tests.split.test_differential import allowed_clusters, compare

pytestmark = [pytest.mark.envoy]

WS = (("connection", "upgrade"), ("upgrade", "websocket"))
HEADERS = ((), (("connection", "upgrade"),), (("upgrade", "websocket"),), WS,
           (("connection", "keep-alive, Upgrade"), ("upgrade", "h2c")))
REQUESTS = [Request(m, p, "svc", h) for p in ("/ws", "/ws/chat", "/plain", "/x")
            for m in ("GET", "POST") for h in HEADERS]


def bootstrap(port: int, admin: int, upstream: int) -> dict[str, Any]:
    routes = [
        {"name": "ws", "match": {"prefix": "/ws"},
         "route": {"cluster": "c0", "timeout": "0s", "upgradeConfigs": [{"upgradeType": "websocket"}]}},
        {"name": "plain", "match": {"prefix": "/plain"}, "route": {"cluster": "c0", "timeout": "0s"}},
        {"name": "rest", "match": {"prefix": "/"},
         "directResponse": {"status": 200, "body": {"inlineString": "NotWebSocket\n"}}},
    ]
    hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": "ingress_ws_to_ws",
           "routeConfig": {"name": "rc", "virtualHosts": [{"name": "app-ws", "domains": ["*"],
                                                           "routes": routes}]},
           "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "ws", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typedConfig": hcm}]}]}
    cluster = {"name": "c0", "type": "STATIC", "connectTimeout": "1s", "loadAssignment": {
        "clusterName": "c0", "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
            "address": "127.0.0.1", "portValue": upstream}}}}]}]}}
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": [listener], "clusters": [cluster]}}


def plan_from(boot: dict[str, Any]) -> KernelPlan:
    return bootstrap_plan("ws", boot)


def test_upgrade_route_agrees_with_envoy(envoy_bin: str, echo_upstreams: dict[str, int]) -> None:
    port, admin = free_ports(2)
    boot = bootstrap(port, admin, echo_upstreams["c0"])
    plan = plan_from(boot)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert [(r.name, r.verdict, r.guard) for r in routes] == [
        (n, Verdict.KERNEL, False) for n in ("ws", "plain", "rest")], [r.reason for r in routes]
    envoy = EnvoyProc(envoy_bin, boot, [port])
    kernel, mismatches, upgraded = 0, [], {}
    try:
        for req in REQUESTS:
            d = decide(plan, "ws", req, random.Random(1))
            status, headers, body = http_request(port, req.method, req.path, req.host, dict(req.headers))
            if d.kind == "envoy":
                assert req.header("upgrade") is not None, (req, d)
                if req.headers == WS:
                    upgraded[req.path] = status
                continue
            kernel += 1
            why = compare(d, req, status, headers, body, allowed_clusters(plan, "ws", d))
            if why:
                mismatches.append(f"{req} -> model {d.kind} {d.cluster}: {why}")
    finally:
        envoy.stop()
    assert not mismatches, "\n".join(mismatches[:5])
    assert kernel == 4 * 2 * 2, kernel  # no header / Connection: upgrade alone
    # where the upgrade config matters: the websocket route lets it through,
    # the others refuse it (Envoy's 403 for an upgrade no route allows)
    assert upgraded == {"/ws": 200, "/ws/chat": 200, "/plain": 403, "/x": 403}, upgraded
