"""`l7fp split` on Istio / Gateway API files: where a route runs (placement) and
what its destination's inbound side does to it (fastpath.inbound_verdict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xds_server.cli import main

PLACED = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [shop-gateway]
  http:
  - match: [{uri: {prefix: /shop}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: egress, namespace: shop}
spec:
  hosts: [edition.example.com]
  gateways: [egress-gateway, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: egress-gateway, port: {number: 80}}}]
  - match: [{gateways: [egress-gateway], port: 80}]
    route: [{destination: {host: edition.example.com, port: {number: 80}}}]
"""

GATEWAY_API = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-route, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge-route, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: productpage, port: 9080}]}]
"""

# A VirtualService to productpage, whose pods need Envoy for every request:
# their AuthorizationPolicy asks for a JWT principal (RBAC the kernel lacks).
JWT_DEST = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: productpage, namespace: shop}
spec:
  hosts: [productpage]
  http:
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: productpage}}
  rules: [{from: [{source: {requestPrincipals: ["issuer/*"]}}]}]
"""

# The same VirtualService; the destination's policy is one the kernel decides
# (a DENY on a path): the client's kernel merges it, the route stays KERNEL.
DENY_DEST = JWT_DEST.replace("requestPrincipals", "notRequestPrincipals").replace(
    """  rules: [{from: [{source: {notRequestPrincipals: ["issuer/*"]}}]}]""",
    """  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]""")


def split_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["split", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_istio_placement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Routes bound to gateways only (the VirtualService's or the match's own
    `gateways:` without `mesh`) are "gateway": in the total, never in `kernel`."""
    (tmp_path / "vs.yaml").write_text(PLACED)
    out = split_json(tmp_path / "vs.yaml", capsys)
    placed = sorted((r["name"], r["placement"], r["verdict"]) for r in out["routes"])
    assert placed == [("egress.shop.0", "mesh", "KERNEL"), ("egress.shop.1", "gateway", "KERNEL"),
                      ("ingress.shop.0", "gateway", "KERNEL"), ("reviews.shop.0", "mesh", "KERNEL")]
    cov = out["coverage"]
    assert cov["routes"] == {"kernel": 2, "total": 4}
    assert cov["by_format"]["istio"]["routes"] == {"kernel": 2, "total": 4}
    assert cov["by_placement"]["mesh"]["routes"] == {"kernel": 2, "total": 2, "kernel_verdict": 2}
    assert cov["by_placement"]["gateway"]["routes"] == {"kernel": 0, "total": 2, "kernel_verdict": 2}
    assert main(["split", str(tmp_path / "vs.yaml")]) == 0
    text = capsys.readouterr().out
    assert "coverage: routes 2/4 (50.0%)" in text
    assert "  mesh (sidecars: L7FP's kernel path): routes 2/2 (100.0%)" in text
    assert "gateway-bound only: routes 2, run by the gateway's Envoy, none by L7FP's kernel" in text
    assert text.count("gateway-bound only (the gateway's Envoy runs these") == 1
    assert main(["split", "--explain", str(tmp_path / "vs.yaml")]) == 0
    assert "     2  KERNEL verdict, but bound to gateways only" in capsys.readouterr().out
    assert main(["split", "--plan", str(tmp_path / "vs.yaml")]) == 0
    assert [e["placement"] for e in json.loads(capsys.readouterr().out)] == ["mesh", "gateway"]


# Bound to a gateway and the mesh: a rule without match runs on both (counted once,
# as the mesh's: a sidecar runs it); a match with its own `gateways: [gw]` only there.
BOTH = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: shop}
spec:
  hosts: [reviews]
  gateways: [shop-gateway, mesh]
  http:
  - match: [{gateways: [shop-gateway], uri: {prefix: /edge}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
  - route: [{destination: {host: reviews, port: {number: 9080}}}]
"""


def test_a_rule_of_a_gateway_and_mesh_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rule without match is in both the mesh's and the gateway's set: one row (mesh),
    not one per set; the gateway-only match is one gateway row."""
    (tmp_path / "vs.yaml").write_text(BOTH)
    out = split_json(tmp_path / "vs.yaml", capsys)
    assert sorted((r["name"], r["placement"]) for r in out["routes"]) == [
        ("both.shop.0", "gateway"), ("both.shop.1", "mesh")]
    by = out["coverage"]["by_placement"]
    assert by["mesh"]["routes"]["total"] == 1 and by["gateway"]["routes"]["total"] == 1
    assert out["coverage"]["routes"] == {"kernel": 1, "total": 2}
    # --plan: one entry per placement, the same file (docs/split.md, "Meaning change")
    assert main(["split", "--plan", str(tmp_path / "vs.yaml")]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [(e["file"], e["placement"]) for e in plans] == [(str(tmp_path / "vs.yaml"), "mesh"),
                                                           (str(tmp_path / "vs.yaml"), "gateway")]


def test_gateway_api_placement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Gateway API route with a Service parent is the mesh's (GAMMA); one
    attached to a Gateway only is the gateway's, and not warned as ignored."""
    (tmp_path / "routes.yaml").write_text(GATEWAY_API)
    out = split_json(tmp_path / "routes.yaml", capsys)
    assert sorted((r["name"], r["placement"]) for r in out["routes"]) == [
        ("edge-route.shop.0", "gateway"), ("mesh-route.shop.0", "mesh")]
    assert out["coverage"]["routes"] == {"kernel": 1, "total": 2}
    (info,) = out["files"].values()
    assert not [s for s in info["skipped"] if "ignored" in s]


def test_destination_inbound_needs_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The client's route is ENVOY when its destination's inbound side hands every
    request to Envoy (the agent's plan view, fastpath.inbound_verdict): KERNEL
    before, though no request of it could stay in the kernel."""
    (tmp_path / "jwt.yaml").write_text(JWT_DEST)
    out = split_json(tmp_path / "jwt.yaml", capsys)
    (route,) = out["routes"]
    assert route["verdict"] == "ENVOY"
    assert route["reason"].startswith("destination productpage: inbound listener needs Envoy")
    assert out["coverage"]["routes"] == {"kernel": 0, "total": 1}
    # --plan is what the BPF side gets: the client's own plan, unchanged
    assert main(["split", "--plan", str(tmp_path / "jwt.yaml")]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    routes = [r for lp in entry["plan"]["listeners"] for vh in lp["virtual_hosts"] for r in vh["routes"]]
    assert [r["verdict"] for r in routes] == ["KERNEL"]


def test_destination_inbound_in_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A destination policy the kernel decides (merged into the client's
    plan) leaves the route KERNEL."""
    (tmp_path / "deny.yaml").write_text(DENY_DEST)
    out = split_json(tmp_path / "deny.yaml", capsys)
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [("KERNEL", "")]
    assert [r["verdict"] for r in out["rules"]] == ["KERNEL"]


def test_equal_inbound_sides_share_one_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """coverage keys its inbound plans by content and caps: an equal inbound side
    built anew (another object, as a fresh reader gives) hits the cache; other caps
    do not. It was keyed by id() and relied on the reader's lru_cache handing equal
    sides as one object (an id can also be reused once its object is freed)."""
    from fastpath import coverage
    from fastpath.classify_route import KernelCaps

    seen: list[dict] = []
    real = coverage._inbound_plan
    monkeypatch.setattr(coverage, "_inbound_plan",
                        lambda res, caps, cache: seen.append(res) or real(res, caps, cache))
    (tmp_path / "jwt.yaml").write_text(JWT_DEST)
    split_json(tmp_path / "jwt.yaml", capsys)
    side = seen[0]
    cache: dict = {}
    first = real(side, None, cache)
    assert real(json.loads(json.dumps(side)), None, cache) is first and len(cache) == 1
    assert real(side, KernelCaps(mirrors=False), cache) is not first and len(cache) == 2
