"""local_ratelimit response_headers_to_add against the real Envoy.

The rate-limited reply the kernel writes (fastpath.synth.reply_bytes of the
reference model's decision) must carry exactly the header lines Envoy's own 429
carries, for every append_action, duplicates and empty values; a request that
passes gets none of them (Envoy adds them only to its local reply). The
listener bucket is the one of envoyproxy/examples local_ratelimit/envoy.yaml.
tests/kernel_decide/test_lrl_headers.py runs the same plan in the kernel.
"""

from __future__ import annotations

import http.client
import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify_route import local_rate_limit
from fastpath.plan import KernelPlan, Verdict
from fastpath.reference import Decision, Request, State, decide
from fastpath.synth import reply_bytes
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports

pytestmark = [pytest.mark.envoy]

LRL_T = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
ON = {"defaultValue": {"numerator": 100, "denominator": "HUNDRED"}}
IGNORED = {"date", "server"}  # Envoy's own on every response; the kernel has none (docs/split.md)


def hv(key: str, value: str, action: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, **({"appendAction": action} if action else {}), **kw}


# the corpus example's header, and every append_action with duplicates
EXAMPLE = [hv("x-local-rate-limit", "true", "OVERWRITE_IF_EXISTS_OR_ADD")]
# (Envoy takes at most 10 per filter config)
MIXED = [hv("x-a", "1"), hv("x-a", "2", "APPEND_IF_EXISTS_OR_ADD"), hv("x-b", "1", "ADD_IF_ABSENT"),
         hv("x-b", "2", "ADD_IF_ABSENT"), hv("x-c", "1", "OVERWRITE_IF_EXISTS"),
         hv("x-d", "1", "OVERWRITE_IF_EXISTS_OR_ADD"), hv("x-d", "2", "OVERWRITE_IF_EXISTS_OR_ADD")]
MORE = [hv("x-m", "add"), hv("x-m", "set", "OVERWRITE_IF_EXISTS_OR_ADD"), hv("x-empty", ""),
        hv("x-kept", "", keepEmptyValue=True), hv("X-Upper", "MiXed"), hv("x-old", "o", append=False)]


def limiter(tokens: int, headers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@type": LRL_T, "statPrefix": "rl", "filterEnabled": ON, "filterEnforced": ON,
            "tokenBucket": {"maxTokens": tokens, "tokensPerFill": tokens, "fillInterval": "3600s"},
            "responseHeadersToAdd": headers}


def bootstrap(port: int, admin: int, upstream: int) -> dict[str, Any]:
    routes = [
        {"name": "mixed", "match": {"prefix": "/mixed"}, "route": {"cluster": "c0", "timeout": "0s"},
         "typedPerFilterConfig": {"envoy.filters.http.local_ratelimit": limiter(1, MIXED)}},
        {"name": "more", "match": {"prefix": "/more"}, "route": {"cluster": "c0", "timeout": "0s"},
         "typedPerFilterConfig": {"envoy.filters.http.local_ratelimit": limiter(1, MORE)}},
        {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "c0", "timeout": "0s"}},
    ]
    hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": "l",
           "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
           "httpFilters": [
               {"name": "envoy.filters.http.local_ratelimit", "typedConfig": limiter(2, EXAMPLE)},
               {"name": "envoy.filters.http.router", "typedConfig": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "l", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typedConfig": hcm}]}]}
    cluster = {"name": "c0", "type": "STATIC", "connectTimeout": "1s", "loadAssignment": {
        "clusterName": "c0", "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
            "address": "127.0.0.1", "portValue": upstream}}}}]}]}}
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": [listener], "clusters": [cluster]}}


def plan_from(boot: dict[str, Any]) -> KernelPlan:
    return bootstrap_plan("lrl", boot)


# (method, path): the listener bucket (2 tokens) over "/", the route's (1) on /mixed
REQUESTS = [("GET", "/a"), ("GET", "/b"), ("GET", "/c"), ("HEAD", "/d"),
            ("GET", "/mixed"), ("GET", "/mixed/x"), ("HEAD", "/mixed"),
            ("GET", "/more"), ("GET", "/more")]


def head_lines(raw: bytes) -> list[tuple[str, str]]:
    """(name, value) lines of a response head, in order."""
    lines = raw.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    return [(n.lower(), v.strip()) for n, v in (x.split(":", 1) for x in lines)]


def envoy_lines(port: int, method: str, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Host": "svc"})
        r = conn.getresponse()
        return r.status, [(n.lower(), v) for n, v in r.getheaders()], r.read()
    finally:
        conn.close()


def by_name(lines: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Header values per name, in order (Envoy orders different names its own way)."""
    out: dict[str, list[str]] = {}
    for n, v in lines:
        if n not in IGNORED:
            out.setdefault(n, []).append(v)
    return out


def kernel_reply(d: Decision, method: str) -> bytes:
    raw = reply_bytes(d.status, d.body, d.headers)
    return raw[:raw.index(b"\r\n\r\n") + 4] if method == "HEAD" else raw


def test_rate_limited_reply_headers_equal_envoys(envoy_bin: str, echo_upstreams: dict[str, int]) -> None:
    port, admin = free_ports(2)
    boot = bootstrap(port, admin, echo_upstreams["c0"])
    plan = plan_from(boot)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert plan.listeners[0].verdict is Verdict.KERNEL, plan.listeners[0].reason
    assert [r.verdict for r in routes] == [Verdict.KERNEL] * 3, [r.reason for r in routes]
    state, rng = State(now_ms=1.0), random.Random(0)
    envoy = EnvoyProc(envoy_bin, boot, [port])
    try:
        replies = 0
        for method, path in REQUESTS:
            d = decide(plan, "l", Request(method, path, "svc"), rng, state)
            status, lines, body = envoy_lines(port, method, path)
            where = (method, path, d, lines)
            assert d.kind in ("forward", "reply") and status == (d.status or 200), where
            if d.kind == "forward":
                assert not {n for n, _ in lines} & {"x-local-rate-limit", "x-a", "x-d"}, where
                continue
            replies += 1
            mine = kernel_reply(d, method)
            assert by_name(lines) == by_name(head_lines(mine)), where
            assert body == mine.split(b"\r\n\r\n", 1)[1], where
        assert replies == 5
    finally:
        envoy.stop()


def test_reply_header_order_and_reasons() -> None:
    lim, why = local_rate_limit(limiter(1, MIXED))
    assert why == [] and lim is not None
    assert lim.response_headers == (("x-d", "2"), ("x-a", "1"), ("x-a", "2"), ("x-b", "1"), ("x-b", "2"))
    lim, why = local_rate_limit(limiter(1, MORE))
    assert why == [] and lim is not None
    assert lim.response_headers == (("x-m", "set"), ("x-old", "o"), ("x-m", "add"), ("x-kept", ""),
                                    ("x-upper", "MiXed"))
    cases = {"enableXRatelimitHeaders": ("DRAFT_VERSION_03", "enable_x_ratelimit_headers"),
             "localClusterRateLimit": ({}, None), "rateLimitedAsResourceExhausted": (True, "Exhausted"),
             "responseHeadersToAdd": ([hv("x-t", "%START_TIME%")], "formatter")}
    for key, (value, reason) in cases.items():
        _, why = local_rate_limit({**limiter(1, []), key: value})
        assert (reason in "; ".join(why)) if reason else why == [], (key, why)
    _, why = local_rate_limit(limiter(1, [hv("content-type", "x/y", "OVERWRITE_IF_EXISTS_OR_ADD")]))
    assert "a header of the local reply itself" in why[0]
