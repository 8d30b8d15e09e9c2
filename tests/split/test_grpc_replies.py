"""Replies to gRPC requests: Envoy answers a request whose content-type is
application/grpc or application/grpc+... with gRPC local replies (HTTP 200,
grpc-status, no body) where it would send 403/429/a direct response; the
kernel's replies are plain HTTP, so such a request goes to Envoy (reference
model and l7fp_http.h). Other content types, `application/grpc-web` and
`Application/GRPC` included, get Envoy's plain replies, which the model
reproduces. tests/kernel_decide/test_grpc_replies.py: l7fp_decide passes
exactly these requests."""

from __future__ import annotations

import http.client
import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import KernelPlan
from fastpath.reference import Request, State, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports
from tests.split.test_lrl_headers import limiter

pytestmark = [pytest.mark.envoy]

GRPC_TYPES = ("application/grpc", "application/grpc+proto", "application/grpc+json")
OTHER_TYPES = ("application/grpc;x=1", "application/grpc-web", "application/grpcx", "Application/GRPC",
               "application/json", None)
PATHS = ("/admin", "/d", "/limited", "/limited", "/nothing")


def bootstrap(port: int, admin: int) -> dict[str, Any]:
    routes = [
        {"name": "d", "match": {"prefix": "/d"}, "directResponse": {"status": 200, "body": {"inlineString": "ok"}}},
        {"name": "limited", "match": {"prefix": "/limited"},
         "directResponse": {"status": 200, "body": {"inlineString": "in"}},
         "typedPerFilterConfig": {"envoy.filters.http.local_ratelimit": limiter(1, [])}},
    ]
    rbac = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"no-admin": {
                "permissions": [{"urlPath": {"path": {"prefix": "/admin"}}}], "principals": [{"any": True}]}}}}
    hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": "g",
           "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
           "httpFilters": [
               {"name": "envoy.filters.http.rbac", "typedConfig": rbac},
               {"name": "envoy.filters.http.local_ratelimit", "typedConfig": {
                   "@type": limiter(1, [])["@type"], "statPrefix": "rl"}},
               {"name": "envoy.filters.http.router", "typedConfig": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "g", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typedConfig": hcm}]}]}
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": [listener]}}


def plan_from(boot: dict[str, Any]) -> KernelPlan:
    return bootstrap_plan("grpc", boot)


def requests(ct: str | None) -> list[Request]:
    headers = (("content-type", ct),) if ct else ()
    return [Request("POST", p, "svc", (*headers, ("content-length", "0"))) for p in PATHS]


def test_grpc_requests_go_to_envoy(envoy_bin: str) -> None:
    port, admin = free_ports(2)
    boot = bootstrap(port, admin)
    plan = plan_from(boot)
    envoy = EnvoyProc(envoy_bin, boot, [port])
    grpc_status, compared = [], 0
    try:
        for ct in (*GRPC_TYPES, *OTHER_TYPES):
            state = State(now_ms=1.0)
            envoy_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for req in requests(ct):
                d = decide(plan, "g", req, random.Random(0), state)
                envoy_conn.request(req.method, req.path, body=b"", headers={"Host": "svc", **dict(req.headers)})
                r = envoy_conn.getresponse()
                status, grpc, body = r.status, r.getheader("grpc-status"), r.read()
                if ct in GRPC_TYPES:
                    assert d.kind == "envoy" and "gRPC" in d.reason, (req, d)
                    grpc_status.append((status, grpc))
                    continue
                assert d.kind == "reply" and grpc is None, (req, d, status, grpc)
                assert (status, body.decode()) == (d.status, d.body), (req, d)
                compared += 1
            envoy_conn.close()
            # each content type's requests share one bucket: refill between them
            envoy.stop()
            envoy = EnvoyProc(envoy_bin, boot, [port])
    finally:
        envoy.stop()
    assert compared == len(OTHER_TYPES) * len(PATHS)
    # what Envoy did with the gRPC ones: 200 + grpc-status 7 (403), 14 (429), 2 (200 "ok"), 12 (404)
    assert {s for s, _ in grpc_status} == {200} and {g for _, g in grpc_status} == {"7", "14", "2", "12"}, \
        grpc_status


def test_grpc_route_matcher_is_envoy() -> None:
    from fastpath.classify_match import route_match

    _, why = route_match({"prefix": "/", "grpc": {}})
    assert why == ["route match grpc (gRPC requests go to Envoy)"]
