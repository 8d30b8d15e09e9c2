"""Query-parameter matchers: the reference model against the real Envoy.

One listener per matcher (route 'hit' with the matcher, then a catch-all
'miss'), every query string of QUERIES sent to each. Where the model decides
(not 'envoy'), Envoy's answer must be the same route. This pins the semantics
the kernel's query matcher (bpf_src/include/l7fp_query.h) copies: the first
occurrence of a name counts, a parameter without '=' has the value "", names
are case-sensitive, '+' and repeated names are left to Envoy.
"""

from __future__ import annotations

from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import KernelPlan
from fastpath.reference import Request, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports, http_request

pytestmark = [pytest.mark.envoy]

MATCHERS: list[dict[str, Any]] = [
    {"name": "a", "string_match": {"exact": "1"}},
    {"name": "a", "string_match": {"exact": ""}},
    {"name": "a", "string_match": {"prefix": "1"}},
    {"name": "a", "string_match": {"suffix": "b"}},
    {"name": "a", "string_match": {"exact": "ab", "ignore_case": True}},
    {"name": "a", "present_match": True},
    {"name": "A", "present_match": True},
    {"name": "great", "string_match": {"exact": "example"}},
]
QUERIES = ["", "?", "?a=1", "?a=1&a=2", "?a=2&a=1", "?a", "?a=", "?A=1", "?b=1&a=1", "?a=1=2",
           "?&a=1", "?a=1&", "?a=x+1", "?a+b=1", "?a=11", "?ab=1", "?a=AB", "?a=ab", "?b=a=1",
           "?a&a=1", "?==1", "?=&a=1", "?great=example", "?great=example&a=b", "?x=1&great=exampl",
           "?a=b&&", "?a=1;a=2", "?a=1/b", "?a=1?b", "?b&c&d&e&f&g&h&a=1", "?b&c&d&e&f&g&h&i&a=1",
           "?a=1&x=" + "y" * 115, "?a=1&x=" + "y" * 250, "?x=" + "y" * 260 + "&a=1"]


def bootstrap(ports: list[int], admin: int) -> dict[str, Any]:
    listeners = []
    for i, (m, port) in enumerate(zip(MATCHERS, ports, strict=True)):
        table = {"name": f"q{i}", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
            {"name": "hit", "match": {"prefix": "/", "query_parameters": [m]},
             "direct_response": {"status": 200, "body": {"inline_string": "hit"}}},
            {"name": "miss", "match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": "miss"}}}]}]}
        listeners.append({
            "name": f"q{i}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/" + em.HCM, "stat_prefix": f"q{i}",
                    "route_config": table,
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}]})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners}}


def plan_from(boot: dict[str, Any], executable: bool = False) -> KernelPlan:
    return bootstrap_plan("n", boot, executable)


def test_query_matchers_model_equals_envoy(envoy_bin: str) -> None:
    ports = free_ports(len(MATCHERS) + 1)
    boot = bootstrap(ports[:-1], ports[-1])
    plan = plan_from(boot)
    envoy = EnvoyProc(envoy_bin, boot, ports[:-1])
    try:
        decided = 0
        for i, port in enumerate(ports[:-1]):
            for q in QUERIES:
                status, _, body = http_request(port, "GET", "/p" + q, "h", {})
                d = decide(plan, f"q{i}", Request("GET", "/p" + q, "h", ()))
                where = (MATCHERS[i], q, status, body, d)
                assert status == 200, where
                if d.kind == "envoy":
                    continue
                decided += 1
                assert body.decode() == d.body, where
        assert decided > len(MATCHERS) * len(QUERIES) // 2
    finally:
        envoy.stop()
