"""Residual and kernel replies against real Envoy.

* One owner per rate-limit bucket: a KERNEL route's limiter is removed from
  the residual (Envoy no longer counts those requests), an ENVOY route keeps it;
  the requests allowed through the union of both paths equal the limit once.
* Kernel replies (local rate limit 429, RBAC 403, fault abort) equal Envoy's own.
* The residual is accepted by Envoy.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.reference import Request, State, decide
from fastpath.split import split_snapshot
from tests.split.harness import EnvoyProc, free_ports, http_request

pytestmark = [pytest.mark.envoy]
LIMIT = 3
LRL_T = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
HCM_T = "type.googleapis.com/" + em.HCM


def limiter(status: int | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": LRL_T, "stat_prefix": "rl",
        "token_bucket": {"max_tokens": LIMIT, "tokens_per_fill": LIMIT, "fill_interval": "3600s"},
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}}
    return cfg


def listener(name: str, port: int) -> dict[str, Any]:
    routes = [
        {"name": "limited", "match": {"prefix": "/limited"}, "route": {"cluster": "up", "timeout": "0s"},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": limiter()}},
        {"name": "envoy-limited", "match": {"prefix": "/envoy-limited"},
         "route": {"cluster": "up", "timeout": "0s", "retry_policy": {"retry_on": "envoy-ratelimited"}},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": limiter()}},
        {"name": "fault", "match": {"prefix": "/fault"}, "route": {"cluster": "up", "timeout": "0s"},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
             "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}},
        {"name": "ok", "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
    ]
    rbac = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"no-admin": {
                "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                "principals": [{"any": True}]}}}}
    filters = [
        {"name": "envoy.filters.http.rbac", "typed_config": rbac},
        {"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {"@type": LRL_T, "stat_prefix": "rl"}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                "@type": HCM_T, "stat_prefix": name, "http_filters": filters,
                "route_config": {"name": "rc", "virtual_hosts": [
                    {"name": "vh", "domains": ["*"], "routes": routes}]}}}]}]}


def cluster(port: int) -> dict[str, Any]:
    return {"name": "up", "type": "STATIC", "load_assignment": {"cluster_name": "up", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}}]}]}}


@pytest.fixture(scope="module")
def setup(envoy_bin: str, echo_upstreams: dict[str, int]) -> Any:
    orig_port, resid_port, admin = free_ports(3)
    orig = listener("orig", orig_port)
    resources = {em.LISTENER: [em.parse(em.LISTENER, listener("resid", resid_port))],
                 em.CLUSTER: [em.parse(em.CLUSTER, cluster(echo_upstreams["c0"]))]}
    result = split_snapshot("node", resources)
    resid = [em.to_json(m) for m in result.residual[em.LISTENER]]
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [orig, *resid],
                                 "clusters": [cluster(echo_upstreams["c0"])]}}
    envoy = EnvoyProc(envoy_bin, boot, [orig_port, resid_port])
    yield result, orig_port, resid_port
    envoy.stop()


def routes(result: Any) -> dict[str, Any]:
    return {r.name: r for r in result.plan.listeners[0].virtual_hosts[0].routes}


def test_verdicts_and_owner(setup: Any) -> None:
    result, _, _ = setup
    r = routes(result)
    assert r["limited"].verdict is Verdict.KERNEL and r["limited"].rate_limit.max_tokens == LIMIT
    assert r["envoy-limited"].verdict is Verdict.ENVOY and "retry_on=envoy-ratelimited" in r["envoy-limited"].reason
    assert r["fault"].verdict is Verdict.KERNEL and r["fault"].fault_abort.status == 503
    assert result.plan.listeners[0].rbac.verdict is Verdict.KERNEL


def get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = http_request(port, "GET", path, "svc", {})
    return status, body


def test_rate_limit_not_doubled(setup: Any) -> None:
    result, _, resid_port = setup
    n = 2 * LIMIT
    # Envoy, running the residual, no longer counts the kernel-owned route...
    assert [get(resid_port, "/limited")[0] for _ in range(n)] == [200] * n
    # ...but still owns the bucket of the route the kernel hands it.
    envoy_owned = [get(resid_port, "/envoy-limited")[0] for _ in range(n)]
    assert envoy_owned == [200] * LIMIT + [429] * LIMIT
    # The kernel (reference model) enforces the limit once: LIMIT pass, the rest get 429.
    state = State()
    kinds = [decide(result.plan, "resid", Request("GET", "/limited", "svc"), random.Random(0), state)
             for _ in range(n)]
    assert [d.kind for d in kinds] == ["forward"] * LIMIT + ["reply"] * LIMIT
    assert all(d.status == 429 for d in kinds[LIMIT:])


def test_kernel_replies_equal_envoys(setup: Any) -> None:
    result, orig_port, _ = setup
    for _ in range(LIMIT):
        get(orig_port, "/limited")
    state = State()
    for _ in range(LIMIT):
        decide(result.plan, "resid", Request("GET", "/limited", "svc"), random.Random(0), state)
    cases = [("/limited", state), ("/admin/x", State()), ("/fault", State()), ("/other", State())]
    for path, st in cases:
        d = decide(result.plan, "resid", Request("GET", path, "svc"), random.Random(0), st)
        assert d.kind == "reply", (path, d)
        status, body = get(orig_port, path)
        assert (status, body.decode()) == (d.status, d.body), path
