"""Regex path rewrites from Istio and Gateway API objects, end to end: the
importer's resources run in a real Envoy, and the split of the same resources
makes the routes KERNEL with the rewrite the kernel does (fastpath/rewrite.py);
the reference model's path equals the one the backend got from Envoy.

* Gateway API `URLRewrite` `ReplaceFullPath` (istiod: uriRegexRewrite
  `/.*` -> the path);
* Istio `HTTPRewrite.uriRegexRewrite` stripping a literal prefix (`^/hub/(.*)`
  -> `/\\1`, the corpus' single-page-app form) and one whose route matches `/`
  (the kernel compares the literal).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.plan import ClusterAction, Verdict
from fastpath.reference import Request, decide
from fastpath.split import plan_of
from tests.conftest import pick_free_port
from tests.istio.harness import Backend, Envoy, make_static, request
from xds_server import istio
from xds_server.istio.messages import to_messages

pytestmark = pytest.mark.envoy

POLICIES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: full, namespace: default}
spec:
  parentRefs: [{kind: Service, group: "", name: web, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /new/page}}
    backendRefs: [{name: web, port: 9080}]
  - backendRefs: [{name: web, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hub, namespace: default}
spec:
  hosts: [hub]
  http:
  - match: [{uri: {prefix: /hub/}}]
    rewrite: {uriRegexRewrite: {match: "^/hub/(.*)", rewrite: "/\\\\1"}}
    route: [{destination: {host: hub}}]
  - rewrite: {uriRegexRewrite: {match: "^/foo.*$", rewrite: /}}
    route: [{destination: {host: hub}}]
"""
MESH = """
services:
  - {name: web, ports: [9080]}
  - {name: hub, ports: [9080]}
pods:
  - {name: web-0, service: web, ip: 127.0.0.131, namespace: default}
  - {name: hub-0, service: hub, ip: 127.0.0.132, namespace: default}
"""
CASES = {  # (host, path) -> what the backend gets
    ("web", "/old/a?x=1"): "web-0 /new/page?x=1",
    ("web", "/oldish"): "web-0 /oldish",  # PathPrefix matches whole segments
    ("web", "/other?y"): "web-0 /other?y",
    ("hub", "/hub/a/b?c=/d"): "hub-0 /a/b?c=/d",
    ("hub", "/hub/"): "hub-0 /",
    ("hub", "/foo/x?q"): "hub-0 /?q",
    ("hub", "/bar/foo"): "hub-0 /bar/foo",
}


def test_imported_rewrites_envoy_split_and_model(envoy_bin: str, tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(POLICIES)
    (tmp_path / "mesh.yaml").write_text(MESH)
    backends = [Backend("web-0", "127.0.0.131", 9080), Backend("hub-0", "127.0.0.132", 9080)]
    envoy = None
    try:
        mesh = istio.load(tmp_path / "policies.yaml", mesh_file=tmp_path / "mesh.yaml")
        assert not list(mesh.objs.warnings)
        res = istio.generate(mesh, "sidecar~127.0.0.130~c-0.default~default.svc.cluster.local")
        to_messages(res)
        port = pick_free_port()
        boot = make_static(res, {"0.0.0.0_9080": port})
        envoy = Envoy(envoy_bin, boot, pick_free_port())
        got = {(h, p): " ".join(map(str, request(port, p, h)))[4:] for h, p in CASES}
        assert got == CASES
        sr = boot["staticResources"]
        plan = plan_of("t", Resources([em.to_json(em.parse(em.LISTENER, x)) for x in sr["listeners"]],
                                      {}, [em.to_json(em.parse(em.CLUSTER, x)) for x in sr["clusters"]],
                                      {}))
        lp = next(x for x in plan.listeners if x.name == "0.0.0.0_9080")
        rewrites = [r for vh in lp.virtual_hosts for r in vh.routes
                    if isinstance(r.action, ClusterAction) and r.action.path_rewrite is not None]
        assert len(rewrites) == 3 and all(r.verdict is Verdict.KERNEL for r in rewrites), rewrites
        assert {r.action.path_rewrite.pattern for r in rewrites} == {"/.*", "^/hub/(.*)", "^/foo.*$"}
        for (host, path), want in CASES.items():
            d = decide(plan, lp.name, Request("GET", path, host))
            assert d.kind == "forward" and f"{d.path}" == want.split(" ", 1)[1], (host, path, d)
    finally:
        if envoy is not None:
            envoy.stop()
        for b in backends:
            b.close()
