"""Importer unit tests: corpus files, warnings, Istio defaults, K8s registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xds_server import istio
from xds_server.istio import registry
from xds_server.istio.messages import to_messages
from xds_server.istio.objects import ObjectSet, load_path
from xds_server.istio.sidecar import CLUSTER, LISTENER, ROUTE

HERE = Path(__file__).parent
CORPUS = Path(os.environ.get("L7FP_CORPUS", HERE.parents[2] / "shared" / "corpus" / "wild"))
ISTIO_KINDS = ("VirtualService", "DestinationRule", "AuthorizationPolicy", "HTTPRoute", "GRPCRoute",
               "ServiceEntry", "Sidecar", "PeerAuthentication")
NODE = "sidecar~198.18.0.10~productpage-v1.default~default.svc.cluster.local"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".yml")
                  and any(f"kind: {k}" in p.read_text(errors="replace") for k in ISTIO_KINDS))


def test_bookinfo_generates_istio_shape() -> None:
    mesh = istio.load(HERE / "bookinfo" / "policies.yaml", mesh_file=HERE / "bookinfo" / "mesh.yaml")
    res = istio.generate(mesh, NODE)
    names = {c["name"] for c in res[CLUSTER]}
    assert {"outbound|9080|v1|reviews.default.svc.cluster.local",
            "outbound|9080||ratings.default.svc.cluster.local", "PassthroughCluster",
            "inbound|9080||"} <= names
    listeners = [x["name"] for x in res[LISTENER]]
    assert listeners == ["virtualOutbound", "0.0.0.0_9080", "virtualInbound"]
    vhosts = {v["name"]: v for v in res[ROUTE][0]["virtualHosts"]}
    default = vhosts["details.default.svc.cluster.local:9080"]["routes"][0]["route"]
    assert default["timeout"] == "0s"  # Istio: route timeout disabled
    assert default["retryPolicy"]["numRetries"] == 2  # Istio's default retry policy
    assert not list(mesh.objs.warnings)
    to_messages(res)


def test_unknown_fields_warn_with_object_and_path(tmp_path: Path) -> None:
    (tmp_path / "vs.yaml").write_text("""
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  bogusTop: 1
  http:
  - match: [{uri: {prefix: /a}, frobnicate: true}]
    delegate: {name: x}
  - route: [{destination: {host: reviews}}]
    sparkle: yes
---
apiVersion: networking.istio.io/v1
kind: EnvoyFilter
metadata: {name: ef}
spec: {}
""")
    objs = load_path(tmp_path)
    mesh = istio.sidecar.mesh_from(objs, registry.Registry())
    reg_svc = registry.Service("reviews", "shop", [registry.Port(9080)])
    mesh.reg.add(reg_svc)
    istio.generate(mesh, "sidecar~198.18.0.2~a.shop~shop.svc.cluster.local")
    lines = list(objs.warnings)
    assert "VirtualService shop/r: spec.bogusTop: unsupported field, ignored" in lines
    assert "VirtualService shop/r: spec.http[1].sparkle: unsupported field, ignored" in lines
    assert any(x.startswith("VirtualService shop/r: spec.http[0].delegate:") for x in lines)
    assert any(x.startswith("EnvoyFilter default/ef:") and "not supported" in x for x in lines)


def test_registry_from_kubernetes_objects(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text("""
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 198.19.1.1, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: web}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: demo, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.18.1.5]
  targetRef: {kind: Pod, name: web-0}
- addresses: [198.18.1.6]
  conditions: {ready: false}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web, version: v1}}
spec: {serviceAccountName: web}
status: {podIP: 198.18.1.5}
""")
    reg = registry.from_k8s(load_path(tmp_path))
    svc = reg.services["web.demo.svc.cluster.local"]
    assert svc.vip == "198.19.1.1" and svc.ports[0].target == 8080
    assert [(e.ip, e.labels.get("version")) for e in svc.endpoints] == [("198.18.1.5", "v1")]
    assert reg.workload_for_node("sidecar~198.18.1.5~web-0.demo~demo.svc.cluster.local").name == "web-0"


@pytest.mark.skipif(not corpus_files(), reason="corpus not present")
def test_every_corpus_istio_file_imports_and_parses() -> None:
    """Each Istio / Gateway API corpus file generates typed xDS messages; nothing crashes."""
    failures = []
    for path in corpus_files():
        try:
            from xds_server.istio import reader
            res = reader.read_file(path)
            to_messages(res)
        except Exception as exc:  # report all files at once
            failures.append(f"{path.relative_to(CORPUS)}: {exc!r}")
    assert not failures, "\n".join(failures)


def test_objectset_ignores_plain_deployments(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    objs = ObjectSet()
    load_path(tmp_path, objs)
    assert objs.count() == 0 and not list(objs.warnings)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_path(tmp_path)


def test_export_to_limits_visibility(tmp_path: Path) -> None:
    (tmp_path / "vs.yaml").write_text("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: a}
spec:
  hosts: [web.a.svc.cluster.local]
  exportTo: ["."]
  http: [{route: [{destination: {host: web.a.svc.cluster.local}}], timeout: 3s}]
""")
    objs = load_path(tmp_path)
    reg = registry.Registry()
    reg.add(registry.Service("web", "a", [registry.Port(80)]))
    mesh = istio.sidecar.mesh_from(objs, reg)

    def web_timeout(ns: str) -> str:
        res = istio.generate(mesh, f"sidecar~198.18.0.9~c.{ns}~{ns}.svc.cluster.local")
        (vh,) = [v for v in res[ROUTE][0]["virtualHosts"] if v["name"].startswith("web.")]
        return str(vh["routes"][0]["route"]["timeout"])

    assert web_timeout("a") == "3s"  # the VirtualService's own namespace sees it
    assert web_timeout("b") == "0s"  # elsewhere: Istio's default route


def test_mesh_config_path_normalization_and_retries(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("""
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    pathNormalization: {normalization: MERGE_SLASHES}
    defaultHttpRetryPolicy: {attempts: 0}
    accessLogFile: /dev/stdout
""")
    objs = load_path(tmp_path)
    reg = registry.Registry()
    reg.add(registry.Service("web", "default", [registry.Port(80)]))
    mesh = istio.sidecar.mesh_from(objs, reg)
    res = istio.generate(mesh, NODE)
    (lis,) = [x for x in res[LISTENER] if x["name"] == "0.0.0.0_80"]
    hcm = lis["filterChains"][0]["filters"][0]["typedConfig"]
    assert hcm["normalizePath"] is True and hcm["mergeSlashes"] is True
    (vh,) = [v for v in res[ROUTE][0]["virtualHosts"] if v["name"].startswith("web.")]
    assert "retryPolicy" not in vh["routes"][0]["route"]  # attempts: 0
    assert list(objs.warnings) == ["MeshConfig istio-system/istio: data.mesh.accessLogFile: "
                                   "MeshConfig field not read by the importer"]


@pytest.mark.parametrize("simple,lb", [
    (None, "LEAST_REQUEST"),  # no DestinationRule: istiod's defaultLBAlgorithm()
    ("UNSPECIFIED", "LEAST_REQUEST"),
    ("LEAST_CONN", "LEAST_REQUEST"),  # deprecated alias
    ("LEAST_REQUEST", "LEAST_REQUEST"),
    ("ROUND_ROBIN", "ROUND_ROBIN"),
    ("RANDOM", "RANDOM"),
    ("BOGUS", "LEAST_REQUEST"),  # istiod's `default:` case; warned
])
def test_load_balancer_default_is_istiods(tmp_path: Path, simple: str | None, lb: str) -> None:
    (tmp_path / "dr.yaml").write_text("" if simple is None else f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web
  subsets: [{{name: v1, labels: {{version: v1}}}}]
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
""")
    objs = load_path(tmp_path)
    reg = registry.Registry()
    reg.add(registry.Service("web", "default", [registry.Port(80)], endpoints=[
        registry.Endpoint("198.18.0.20", {"version": "v1"}),
        registry.Endpoint("198.18.0.21", {"version": "v2"})]))
    res = istio.generate(istio.sidecar.mesh_from(objs, reg), NODE)
    got = {c["name"]: c["lbPolicy"] for c in res[CLUSTER] if c["name"].startswith("outbound|80|")}
    want = {"outbound|80||web.default.svc.cluster.local": lb}
    if simple is not None:
        want["outbound|80|v1|web.default.svc.cluster.local"] = lb
    assert got == want
    warned = list(objs.warnings)
    if simple == "BOGUS":  # (and once more for the subset, which inherits the policy)
        assert warned[0] == ("DestinationRule default/web: spec.trafficPolicy.loadBalancer.simple: "
                             "'BOGUS' unknown; LEAST_REQUEST used"), warned
    else:
        assert not warned
