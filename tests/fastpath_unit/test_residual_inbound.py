"""One owner per bucket for inbound listeners (DESIGN.md rule 3).

A destination's inbound local rate limit is one bucket per destination pod for
all its clients; the kernel of one client sees only its own requests, so
Envoy stays the owner: the residual keeps the inbound limiter (it used to
remove it while no kernel enforced it). An outbound limiter owned by the
kernel is still removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastpath import envoy_model as em
from fastpath.plan import Direction
from fastpath.split import split_snapshot
from mesh import envoyconf as E
from mesh import spec as S
from mesh.netrules import ServiceAddr

LRL = {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    "stat_prefix": "rl", "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "3600s"},
    "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}}}


def _resources(tmp: Path, side: str) -> tuple[str, dict[str, list[Any]]]:
    import json

    (tmp / "pol.json").write_text(json.dumps({"limited": {side: {"http_filters": [LRL]}}}))
    (tmp / "mesh.json").write_text(json.dumps({"namespace": "u", "policies": "pol.json", "services": {
        "limited": {"command": ["true"], "ports": [9200]}}}))
    spec = S.load(tmp / "mesh.json", name="u")
    svcs = [ServiceAddr("limited", "198.19.0.3", (9200,), ("198.18.0.3",), ("limited",))]
    pod = E.PodInfo("limited-0", "limited", "198.18.0.3", "sidecar~198.18.0.3~limited-0.u~u.svc.cluster.local")
    res = E.pod_resources(spec, pod, svcs, E.Delivery())
    keep = (em.LISTENER, em.ROUTE, em.CLUSTER, em.ENDPOINT)
    return pod.node_id, {u: [em.from_json(u, d) for d in ds] for u, ds in res.items() if u in keep}


def _limiters(residual: dict[str, list[Any]], listener: str) -> list[str]:
    out = []
    for m in residual[em.LISTENER]:
        j = em.to_json(m)
        if j["name"] == listener:
            out += [f["name"] for ch in j["filterChains"] for x in ch["filters"]
                    for f in x["typedConfig"].get("httpFilters", []) if "ratelimit" in f["name"]]
    return out


def test_inbound_limiter_stays_with_envoy(tmp_path: Path) -> None:
    node, res = _resources(tmp_path, "inbound")
    got = split_snapshot(node, res)
    lp = next(lp for lp in got.plan.listeners if lp.direction is Direction.INBOUND)
    assert lp.local_rate_limit is not None and lp.local_rate_limit.max_tokens == 5
    assert _limiters(got.residual, "virtualInbound") == ["envoy.filters.http.local_ratelimit"]


def test_outbound_limiter_owned_by_the_kernel_is_removed(tmp_path: Path) -> None:
    node, res = _resources(tmp_path, "outbound")
    got = split_snapshot(node, res)
    assert _limiters(got.residual, "198.19.0.3_9200") == []
