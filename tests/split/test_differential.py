"""Differential test: the reference model's decision equals what real Envoy does.

For Hypothesis-generated route tables (one listener per table, one Envoy per
batch of tables) and requests (some routes with a matcher the kernel
evaluates only in part: a punt entry that keeps the rest, fastpath.synth_punt;
a request that fails the rest must get Envoy's later route), every request the model handles in the kernel
(decision forward/reply) must get from Envoy the same status, the same cluster
(the echo upstream says its name), the same forwarded path/host/added headers,
and for kernel replies the same body or Location.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.reference import Decision, Request, decide
from fastpath.synth_tables import punt_match
from tests.split.harness import CLUSTERS, EnvoyProc, bootstrap_plan, free_ports, http_request
from tests.split.tables import FAULT_T, requests, route_table

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
TABLES = 6


def bootstrap(tables: list[dict[str, Any]], ports: list[int], upstreams: dict[str, int],
              admin: int) -> dict[str, Any]:
    listeners = [{
        "name": f"t{i}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/" + em.HCM, "stat_prefix": f"t{i}",
                "route_config": table,
                "http_filters": [
                    {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_T}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    } for i, (table, port) in enumerate(zip(tables, ports, strict=True))]
    clusters = [{"name": c, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": c, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": upstreams[c]}}}}]}]}} for c in CLUSTERS]
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def compare(d: Decision, req: Request, status: int, headers: dict[str, str], body: bytes,
            allowed: set[str]) -> str:
    """'' if Envoy's answer agrees with the model's decision, else what differs."""
    if d.kind == "reply":
        if status != d.status:
            return f"status {status} != model {d.status}"
        if d.location and headers.get("location") != d.location:
            return f"location {headers.get('location')} != model {d.location}"
        if d.body and body.decode() != d.body:
            return f"body {body!r} != model {d.body!r}"
        return ""
    if status != 200:
        return f"status {status}, model forwards to {d.cluster}"
    echo = json.loads(body)
    if echo["cluster"] not in allowed:
        return f"cluster {echo['cluster']} not in model's {sorted(allowed)}"
    if echo["path"] != d.path:
        return f"path {echo['path']} != model {d.path}"
    if echo["headers"].get("host") != d.host:
        return f"host {echo['headers'].get('host')} != model {d.host}"
    for k, v in d.add_headers:
        if echo["headers"].get(k) != v:
            return f"header {k}={echo['headers'].get(k)} != model {v}"
    return ""


PARTIAL = "kernel decision: the kernel evaluates only part of the matcher"


def partial_punts(plan: Any) -> Any:
    """The classifier's plan with the KERNEL routes whose matcher the kernel
    evaluates only in part (`:authority`) made ENVOY, as executable_plan
    makes them; its other punts are left out, so the model is checked on all
    the IR can express."""
    def route(r: Any) -> Any:
        if r.verdict is Verdict.KERNEL and punt_match(r.match) != r.match:
            return dataclasses.replace(r, verdict=Verdict.ENVOY, reason=PARTIAL)
        return r
    return dataclasses.replace(plan, listeners=tuple(dataclasses.replace(lp, virtual_hosts=tuple(
        dataclasses.replace(vh, routes=tuple(route(r) for r in vh.routes))
        for vh in lp.virtual_hosts)) for lp in plan.listeners))


def allowed_clusters(plan: Any, listener: str, d: Decision) -> set[str]:
    for lp in plan.listeners:
        if lp.name != listener:
            continue
        for vh in lp.virtual_hosts:
            for r in vh.routes:
                if r.name == d.route and hasattr(r.action, "clusters"):
                    return {c.name for c in r.action.clusters if c.weight > 0 or len(r.action.clusters) == 1}
    return {d.cluster}


@settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(tables=st.lists(route_table(), min_size=TABLES, max_size=TABLES),
       reqs=st.lists(requests, min_size=25, max_size=25))
def test_reference_model_agrees_with_envoy(envoy_bin: str, echo_upstreams: dict[str, int],
                                           tables: list[dict[str, Any]], reqs: list[Request]) -> None:
    *ports, admin = free_ports(TABLES + 1)
    boot = bootstrap(tables, ports, echo_upstreams, admin)
    plan = partial_punts(bootstrap_plan("test", boot, executable=False))
    # Only the routes given a retry that can fire, a range matcher or an
    # :authority matcher are ENVOY: they stay as punt entries, and a request
    # that reaches one must not fall through to a later route.
    for lp in plan.listeners:
        for vh in lp.virtual_hosts:
            for r in vh.routes:
                assert (r.verdict is Verdict.ENVOY) == any(
                    why in r.reason for why in ("retry_on=envoy-ratelimited", "range_match", PARTIAL)), r
    envoy = EnvoyProc(envoy_bin, boot, ports)
    mismatches, checked, punted = [], 0, 0
    try:
        for i, port in enumerate(ports):
            for req in reqs:
                d = decide(plan, f"t{i}", req, random.Random(1))
                if d.kind == "envoy":
                    punted += 1
                    continue
                status, headers, body = http_request(port, req.method, req.path, req.host, dict(req.headers))
                why = compare(d, req, status, headers, body, allowed_clusters(plan, f"t{i}", d))
                checked += 1
                if why:
                    mismatches.append(f"table {i} {json.dumps(tables[i])}\n  {req}\n  {d}\n  -> {why}")
    finally:
        envoy.stop()
    assert not mismatches, "\n".join(mismatches[:5])
    assert checked > 0
    print(f"checked {checked}, punted {punted}")
