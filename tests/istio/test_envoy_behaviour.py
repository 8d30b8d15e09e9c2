"""Bookinfo-style Istio policies, imported and run in a real Envoy.

Behaviour is checked with requests (as the Istio docs describe it), not by
reading the generated config: weighted subsets, header match, fault abort,
retries, AuthorizationPolicy ALLOW/DENY.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pick_free_port
from tests.istio.harness import Backend, Envoy, make_static, request
from xds_server import istio
from xds_server.istio.messages import to_messages

pytestmark = pytest.mark.envoy
HERE = Path(__file__).parent
# Loopback stand-ins for the pods of bookinfo/mesh.yaml (198.18.0.x -> 127.0.0.11x).
LOOPBACK = {f"198.18.0.{i}": f"127.0.0.1{i}" for i in range(10, 16)}


@pytest.fixture(scope="module")
def mesh_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (HERE / "bookinfo" / "mesh.yaml").read_text()
    for a, b in LOOPBACK.items():
        text = text.replace(a + ",", b + ",")
    path = tmp_path_factory.mktemp("mesh") / "mesh.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def backends(mesh_file: Path) -> Iterator[dict[str, Backend]]:
    pods = {"productpage-v1": "127.0.0.110", "reviews-v1": "127.0.0.111", "reviews-v2": "127.0.0.112",
            "reviews-v3": "127.0.0.113", "ratings-v1": "127.0.0.114", "details-v1": "127.0.0.115"}
    started = {}
    try:
        for name, ip in pods.items():
            started[name] = Backend(name, ip, 9080)
        yield started
    finally:
        for b in started.values():
            b.close()


def _run(envoy_bin: str, mesh_file: Path, node_pod: str, ip: str) -> tuple[Envoy, dict[str, int]]:
    mesh = istio.load(HERE / "bookinfo" / "policies.yaml", mesh_file=mesh_file, inbound_address=ip)
    res = istio.generate(mesh, f"sidecar~{ip}~{node_pod}.default~default.svc.cluster.local")
    to_messages(res)  # the same resources must also parse as typed xDS messages
    ports = {"0.0.0.0_9080": pick_free_port(), "virtualInbound": pick_free_port()}
    return Envoy(envoy_bin, make_static(res, ports), pick_free_port()), ports


@pytest.fixture(scope="module")
def productpage(envoy_bin: str, mesh_file: Path, backends: dict[str, Backend]) -> Iterator[int]:
    envoy, ports = _run(envoy_bin, mesh_file, "productpage-v1", "127.0.0.110")
    try:
        yield ports["0.0.0.0_9080"]
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def details_inbound(envoy_bin: str, mesh_file: Path, backends: dict[str, Backend]) -> Iterator[int]:
    envoy, ports = _run(envoy_bin, mesh_file, "details-v1", "127.0.0.115")
    try:
        yield ports["virtualInbound"]
    finally:
        envoy.stop()


def test_header_match_routes_jason_to_v2(productpage: int) -> None:
    seen = Counter(request(productpage, "/reviews/1", "reviews:9080", headers={"end-user": "jason"})[1]
                   .split()[0] for _ in range(20))
    assert seen == Counter({"reviews-v2": 20})


def test_weighted_subsets_80_20(productpage: int) -> None:
    n = 300
    seen = Counter(request(productpage, "/reviews/1", "reviews:9080")[1].split()[0] for _ in range(n))
    assert set(seen) == {"reviews-v1", "reviews-v3"}, seen
    # Binomial(300, 0.2): mean 60, sd 6.9; +-5 sd keeps a false failure below 1e-6.
    assert 25 <= seen["reviews-v3"] <= 95, seen


def test_fault_abort_for_jason_only(productpage: int) -> None:
    code, body = request(productpage, "/ratings/0", "ratings", headers={"end-user": "jason"})
    assert (code, body) == (500, "fault filter abort")
    assert request(productpage, "/ratings/0", "ratings.default.svc.cluster.local") == (
        200, "ratings-v1 /ratings/0")


def test_retries_hide_two_503s(productpage: int, backends: dict[str, Backend]) -> None:
    backends["ratings-v1"].flaky_left = 2
    assert request(productpage, "/flaky", "ratings:9080") == (200, "ratings-v1 /flaky")
    assert backends["ratings-v1"].flaky_left == 0


def test_default_route_and_unknown_host(productpage: int) -> None:
    assert request(productpage, "/x", "details:9080") == (200, "details-v1 /x")
    assert request(productpage, "/x", "198.19.0.13:9080")[0] == 200  # the service VIP


def test_authorization_policy_allow_and_deny(details_inbound: int) -> None:
    assert request(details_inbound, "/details/1", "details") == (200, "details-v1 /details/1")
    assert request(details_inbound, "/details/1", "details", method="POST")[0] == 403
    assert request(details_inbound, "/reviews/1", "details")[0] == 403
    code, body = request(details_inbound, "/details/admin", "details")
    assert (code, body) == (403, "RBAC: access denied")


def test_gateway_api_path_prefix_matches_whole_segments(envoy_bin: str, tmp_path: Path) -> None:
    """HTTPRoute PathPrefix /api matches /api and /api/x but not /apix (Gateway API spec)."""
    (tmp_path / "route.yaml").write_text("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: default}
spec:
  parentRefs: [{kind: Service, group: "", name: web, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api/}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-hit, value: api}]}
    backendRefs: [{name: web-v2, port: 9080}]
  - backendRefs: [{name: web, port: 9080}]
""")
    (tmp_path / "mesh.yaml").write_text("""
services:
  - {name: web, ports: [9080]}
  - {name: web-v2, ports: [9080]}
pods:
  - {name: web-0, service: web, ip: 127.0.0.121, namespace: default}
  - {name: web-v2-0, service: web-v2, ip: 127.0.0.122, namespace: default}
""")
    backends = [Backend("web-0", "127.0.0.121", 9080), Backend("web-v2-0", "127.0.0.122", 9080)]
    envoy = None
    try:
        mesh = istio.load(tmp_path / "route.yaml", mesh_file=tmp_path / "mesh.yaml")
        res = istio.generate(mesh, "sidecar~127.0.0.120~c-0.default~default.svc.cluster.local")
        to_messages(res)
        port = pick_free_port()
        envoy = Envoy(envoy_bin, make_static(res, {"0.0.0.0_9080": port}), pick_free_port())
        got = {p: request(port, p, "web")[1].split()[0] for p in ("/api", "/api/x", "/apix", "/")}
        assert got == {"/api": "web-v2-0", "/api/x": "web-v2-0", "/apix": "web-0", "/": "web-0"}
        assert not list(mesh.objs.warnings)
    finally:
        if envoy is not None:
            envoy.stop()
        for b in backends:
            b.close()


def test_mesh_config_default_retry_policy_off(envoy_bin: str, mesh_file: Path,
                                              backends: dict[str, Backend], tmp_path: Path) -> None:
    """MeshConfig.defaultHttpRetryPolicy {attempts: 0}: no retry on routes without `retries:`."""
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "policies.yaml").write_text((HERE / "bookinfo" / "policies.yaml").read_text())
    (pol / "mesh.yaml").write_text("""
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultHttpRetryPolicy:
      attempts: 0
""")
    mesh = istio.load(pol, mesh_file=mesh_file, inbound_address="127.0.0.110")
    res = istio.generate(mesh, "sidecar~127.0.0.110~productpage-v1.default~default.svc.cluster.local")
    assert not list(mesh.objs.warnings)
    port = pick_free_port()
    envoy = Envoy(envoy_bin, make_static(res, {"0.0.0.0_9080": port}), pick_free_port())
    try:
        backends["details-v1"].flaky_left = 2
        assert request(port, "/flaky", "details")[0] == 503  # details: istiod's default route
        assert request(port, "/flaky", "details")[0] == 503
        assert request(port, "/flaky", "details") == (200, "details-v1 /flaky")
        backends["ratings-v1"].flaky_left = 2  # ratings has explicit `retries:`: still retried
        assert request(port, "/flaky", "ratings") == (200, "ratings-v1 /flaky")
    finally:
        envoy.stop()


CORPUS_SAMPLE = [  # feature-rich Istio / Gateway API files of the wild corpus
    "redhat-scholars__istio-tutorial/istiofiles__virtual-service-recommendation-v1-mirror-v2.yml",
    "redhat-scholars__istio-tutorial/istiofiles__destination-rule-recommendation_cb_policy_pool_ejection.yml",
    "redhat-scholars__istio-tutorial/istiofiles__authorization-policy-jwt.yaml",
    "istio__istio/samples__bookinfo__networking__virtual-service-ratings-test-delay.yaml",
    "istio__istio/samples__bookinfo__networking__egress-rule-google-apis.yaml",
    "GoogleCloudPlatform__istio-samples/security-intro__manifests__authz-frontend.yaml",
    "kubernetes-sigs__gateway-api/examples__standard__http-request-mirroring__httproute-mirroring.yaml",
    "kubernetes-sigs__gateway-api/examples__standard__http-redirect-rewrite__httproute-rewrite-prefix-path.yaml",
    "kubernetes-sigs__gateway-api/examples__standard__basic-grpc.yaml",
]


def test_corpus_sample_passes_envoy_validation(envoy_bin: str, tmp_path: Path) -> None:
    """Envoy itself accepts the generated config (`envoy --mode validate`), not only betterproto."""
    import json
    import subprocess

    from tests.istio.test_importer import CORPUS
    from xds_server.istio import reader
    from xds_server.istio.sidecar import LISTENER

    if not CORPUS.is_dir():
        pytest.skip("corpus not present")
    procs = []
    for i, rel in enumerate(CORPUS_SAMPLE):
        res = reader.read_file(CORPUS / rel)
        boot = make_static(res, {x["name"]: 20000 + j for j, x in enumerate(res[LISTENER])})
        path = tmp_path / f"b{i}.json"
        path.write_text(json.dumps(boot))
        procs.append((rel, subprocess.Popen(
            [envoy_bin, "--mode", "validate", "-c", str(path), "-l", "error", "--disable-hot-restart"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = []
    for rel, proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failed.append(f"{rel}: {out.strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)
