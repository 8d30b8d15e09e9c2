"""Differential test of RBAC: the reference model denies (403) exactly what Envoy denies.

Hypothesis-generated RBAC filters (allow/deny; path, method, header, port,
and/or/not permissions; source CIDR, header, not principals), one listener per
filter in one Envoy, the same requests sent to each.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.plan import Verdict
from fastpath.reference import Request, decide
from fastpath.split import plan_of
from tests.split.harness import EnvoyProc, free_ports, http_request
from tests.split.tables import rbac_config, requests

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
N = 8
RBAC_T = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def listener(i: int, port: int, rbac: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"t{i}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                "@type": "type.googleapis.com/" + em.HCM, "stat_prefix": f"t{i}",
                "http_filters": [{"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_T, **rbac}},
                                 {"name": "envoy.filters.http.router", "typed_config": {
                                     "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
            }}]}]}


@st.composite
def rbac_set(draw: Any) -> tuple[list[int], list[dict[str, Any]]]:
    ports = free_ports(N + 1)
    return ports, [draw(rbac_config(p)) for p in ports[:N]]


@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=rbac_set(), reqs=st.lists(requests, min_size=25, max_size=25))
def test_rbac_model_agrees_with_envoy(envoy_bin: str, data: Any, reqs: list[Request]) -> None:
    (*ports, admin), rbacs = data
    lis = [listener(i, p, r) for i, (p, r) in enumerate(zip(ports, rbacs, strict=True))]
    plan = plan_of("t", Resources([em.to_json(em.parse(em.LISTENER, x)) for x in lis], {}, [], {}))
    assert all(lp.rbac is not None and lp.rbac.verdict is Verdict.KERNEL for lp in plan.listeners)
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": lis}}
    envoy = EnvoyProc(envoy_bin, boot, ports)
    bad, seen = [], set()
    try:
        for i, port in enumerate(ports):
            for req in reqs:
                d = decide(plan, f"t{i}", req, random.Random(0))
                if d.kind == "envoy":
                    continue
                status, _, body = http_request(port, req.method, req.path, req.host, dict(req.headers))
                seen.add(status)
                if (status, body.decode()) != (d.status, d.body):
                    bad.append(f"{rbacs[i]}\n  {req}\n  envoy {status} {body!r} model {d.status} {d.body!r}")
    finally:
        envoy.stop()
    assert not bad, "\n".join(bad[:5])
    print("statuses seen:", sorted(seen))
    assert seen, "no request was decided in the kernel"
