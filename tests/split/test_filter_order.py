"""The order of the HCM's policy filters decides which reply wins; the model follows it.

Two listeners in one real Envoy, the same route (fault abort 100 % and a
2-token bucket) and RBAC denying /deny, with the filters in opposite orders.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.reference import Request, State, decide
from fastpath.split import plan_of
from tests.split.harness import EnvoyProc, free_ports, http_request
from tests.split.test_residual import LRL_T, limiter

pytestmark = [pytest.mark.envoy]
FAULT_T = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RBAC_T = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
FILTERS = {
    "rbac": {"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_T, "rules": {
        "action": "DENY", "policies": {"d": {"permissions": [{"url_path": {"path": {"prefix": "/deny"}}}],
                                             "principals": [{"any": True}]}}}}},
    "local_ratelimit": {"name": "envoy.filters.http.local_ratelimit",
                        "typed_config": {**limiter(), "token_bucket": {
                            "max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "3600s"}}},
    "fault": {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": FAULT_T, "abort": {"http_status": 418, "percentage": {"numerator": 100}}}},
}


def listener(name: str, port: int, order: list[str]) -> dict[str, Any]:
    routes = [{"name": "f", "match": {"prefix": "/"}, "direct_response": {"status": 200}}]
    filters = [FILTERS[k] for k in order] + [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                "@type": "type.googleapis.com/" + em.HCM, "stat_prefix": name, "http_filters": filters,
                "route_config": {"name": "rc", "virtual_hosts": [
                    {"name": "vh", "domains": ["only.test"], "routes": routes}]}}}]}]}


ORDERS = [["rbac", "fault", "local_ratelimit"], ["local_ratelimit", "fault", "rbac"],
          ["fault", "rbac", "local_ratelimit"]]


def test_filter_order(envoy_bin: str) -> None:
    *ports, admin = free_ports(len(ORDERS) + 1)
    lis = [listener(f"o{i}", p, o) for i, (p, o) in enumerate(zip(ports, ORDERS, strict=True))]
    plan = plan_of("t", Resources([em.to_json(em.parse(em.LISTENER, x)) for x in lis], {}, [], {}))
    assert [lp.filter_order for lp in plan.listeners] == [tuple(o) for o in ORDERS]
    assert LRL_T in str(lis[0])
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": lis}}
    envoy = EnvoyProc(envoy_bin, boot, ports)
    try:
        for i, port in enumerate(ports):
            state = State()
            for path, host in [("/deny", "only.test"), ("/x", "only.test"), ("/x", "other.test"),
                               ("/deny", "other.test"), ("/x", "only.test")]:
                d = decide(plan, f"o{i}", Request("GET", path, host), random.Random(0), state)
                status, _, body = http_request(port, "GET", path, host, {})
                assert (status, body.decode()) == (d.status, d.body), (ORDERS[i], path, host, d)
    finally:
        envoy.stop()
