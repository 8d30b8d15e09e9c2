"""Guarded routes against the real Envoy: CORS and CSRF act only on some requests.

A route with a CORS policy (Envoy's CORS filter) or under a CSRF policy stays
KERNEL; guard punt entries send requests with Origin (CORS) and with a mutating
method (CSRF) to Envoy. Checked here with a real Envoy running the same config:
every request the reference model keeps in the kernel gets from Envoy exactly
the model's answer and no CORS header (so the filter did nothing to it), and
the requests the guards hand over are ones the filters do change (403 from
CSRF, access-control-* headers from CORS), so the guards are needed.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.coverage import Report, _rows
from fastpath.plan import Verdict
from fastpath.reference import Request, decide
from fastpath.split import plan_of
from tests.split.harness import CLUSTERS, EnvoyProc, free_ports, http_request
from tests.split.test_differential import allowed_clusters, compare

pytestmark = [pytest.mark.envoy]

CORS_T = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
CSRF_T = "type.googleapis.com/envoy.extensions.filters.http.csrf.v3.CsrfPolicy"
ON = {"defaultValue": {"numerator": 100, "denominator": "HUNDRED"}}
OFF = {"defaultValue": {"numerator": 0, "denominator": "HUNDRED"}}
CORS_POLICY = {"@type": CORS_T, "allowOriginStringMatch": [{"exact": "http://app.example"}],
               "allowMethods": "GET,POST", "exposeHeaders": "x-echo", "maxAge": "60"}


def bootstrap(port: int, admin: int, upstreams: dict[str, int]) -> dict[str, Any]:
    routes = [
        {"name": "cors", "match": {"prefix": "/cors"}, "route": {"cluster": "c0", "timeout": "0s"},
         "typedPerFilterConfig": {"envoy.filters.http.cors": CORS_POLICY}},
        {"name": "csrf-off", "match": {"prefix": "/open"}, "route": {"cluster": "c1", "timeout": "0s"},
         "typedPerFilterConfig": {"envoy.filters.http.csrf": {"@type": CSRF_T, "filterEnabled": OFF}}},
        {"name": "get-only", "match": {"prefix": "/get", "headers": [
            {"name": ":method", "stringMatch": {"exact": "GET"}}]}, "route": {"cluster": "c2", "timeout": "0s"}},
        {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "c2", "timeout": "0s"}},
    ]
    hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": "g",
           "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
           "httpFilters": [
               {"name": "envoy.filters.http.cors", "typedConfig": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
               {"name": "envoy.filters.http.csrf", "typedConfig": {"@type": CSRF_T, "filterEnabled": ON}},
               {"name": "envoy.filters.http.router", "typedConfig": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "g", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typedConfig": hcm}]}]}
    clusters = [{"name": c, "type": "STATIC", "connectTimeout": "1s", "loadAssignment": {
        "clusterName": c, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
            "address": "127.0.0.1", "portValue": upstreams[c]}}}}]}]}} for c in CLUSTERS]
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": [listener], "clusters": clusters}}


REQUESTS = [Request(m, p, "svc", h) for p in ("/cors/a", "/open/b", "/get/c", "/x")
            for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
            for h in ((), (("origin", "http://app.example"),),
                      (("origin", "http://app.example"), ("access-control-request-method", "GET")))]


def test_guarded_routes_agree_with_envoy(envoy_bin: str, echo_upstreams: dict[str, int]) -> None:
    port, admin = free_ports(2)
    boot = bootstrap(port, admin, echo_upstreams)
    listeners = [em.to_json(em.parse(em.LISTENER, x)) for x in boot["staticResources"]["listeners"]]
    clusters = [em.to_json(em.parse(em.CLUSTER, x)) for x in boot["staticResources"]["clusters"]]
    plan = plan_of("guards", Resources(listeners, {}, clusters, {}))
    routes = plan.listeners[0].virtual_hosts[0].routes
    # every policy route is KERNEL; guards sit right before the route they guard
    assert [(r.name, r.verdict, r.guard) for r in routes if not r.guard] == [
        (n, Verdict.KERNEL, False) for n in ("cors", "csrf-off", "get-only", "rest")]
    # cors: Origin + 4 CSRF methods; csrf-off: none; get-only: GET never mutates; rest: 4 methods
    assert sum(r.guard for r in routes) == 5 + 0 + 0 + 4
    report = Report(routes=[], rules=[], files={}, plans=[])
    _rows("guards", plan, report)
    assert len(report.routes) == 4 and all(r.verdict == "KERNEL" for r in report.routes)

    envoy = EnvoyProc(envoy_bin, boot, [port])
    kernel, handed, changed_by_filter, mismatches = 0, 0, 0, []
    try:
        for req in REQUESTS:
            d = decide(plan, "g", req, random.Random(1))
            status, headers, body = http_request(port, req.method, req.path, req.host, dict(req.headers))
            cors_headers = sorted(k for k in headers if k.startswith("access-control-"))
            if d.kind == "envoy":
                handed += 1
                changed_by_filter += status == 403 or bool(cors_headers)
                continue
            kernel += 1
            why = compare(d, req, status, headers, body, allowed_clusters(plan, "g", d))
            if cors_headers:
                why = f"Envoy's CORS filter added {cors_headers}"
            if why:
                mismatches.append(f"{req} -> model {d.kind} {d.cluster}: {why}")
    finally:
        envoy.stop()
    print(f"kernel {kernel}, handed to Envoy {handed}, of those changed by a filter {changed_by_filter}")
    assert not mismatches, "\n".join(mismatches[:5])
    # the kernel keeps most requests; the guards hand over only Origin / mutating ones
    assert kernel >= 20 and handed >= 20, (kernel, handed)
    assert changed_by_filter >= 15, changed_by_filter  # the guarded requests do need Envoy
