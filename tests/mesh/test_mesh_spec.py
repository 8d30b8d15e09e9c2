"""Mesh file validation: one clear error naming the place; the demo file is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import spec

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "compose" / "demo" / "mesh.yaml"

BASE = """
name: t
services:
  a:
    command: [sleep, "100"]
    ports: [8080]
    calls: [b]
  b:
    command: [sleep, "100"]
    ports: [9000]
"""


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_demo_mesh_is_valid() -> None:
    s = spec.load(DEMO)
    assert s.name == "demo"
    assert {"frontend", "user", "user-v2", "static"} <= set(s.services)
    assert s.policies["post-storage"]["inbound"]["http_filters"][0]["name"] == "envoy.filters.http.rbac"
    assert len(s.pod_names()) == 12


def test_name_override(tmp_path: Path) -> None:
    assert spec.load(write(tmp_path, BASE), name="other").name == "other"


@pytest.mark.parametrize("mutation, place, words", [
    (("calls: [b]", "calls: [nope]"), "services.a.calls", "unknown service 'nope'"),
    (("ports: [9000]", "ports: [15001]"), "services.b.ports", "clashes with a sidecar port"),
    (("ports: [9000]", "ports: [9000, 9000]"), "services.b.ports", "listed twice"),
    (('    command: [sleep, "100"]\n    ports: [9000]', "    ports: [9000]"),
     "services.b.command", "missing"),
    (("    ports: [8080]\n", "    ports: [8080]\n    replicas: 0\n"), "services.a.replicas", "1 to 64"),
    (("  a:\n", "  A_bad:\n"), "services.A_bad", "service name must match"),
    (("    calls: [b]\n", "    calls: [b]\n    colour: red\n"), "services.a", "unknown key"),
])
def test_bad_file_names_the_place(tmp_path: Path, mutation: tuple[str, str], place: str,
                                  words: str) -> None:
    text = BASE.replace(*mutation)
    assert text != BASE
    with pytest.raises(spec.MeshFileError) as exc:
        spec.load(write(tmp_path, text))
    msg = str(exc.value)
    assert place in msg and words in msg and "mesh.yaml" in msg


def test_policy_with_unknown_cluster(tmp_path: Path) -> None:
    pol = "b:\n  outbound:\n    routes:\n    - match: {prefix: /}\n      route: {cluster: ghost}\n"
    write(tmp_path, pol, "pol.yaml")
    with pytest.raises(spec.MeshFileError,
                       match=r"/pol\.yaml: b\.outbound\.routes\[0\]\.route\.cluster: unknown service 'ghost'"):
        spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))
    inline = BASE.replace("    ports: [9000]\n", "    ports: [9000]\n    policy:\n      outbound:\n"
                          "        routes: [{match: {prefix: /}, route: {cluster: ghost}}]\n")
    with pytest.raises(spec.MeshFileError, match=r"/mesh\.yaml: services\.b\.policy\.outbound\."
                                                 r"routes\[0\]\.route\.cluster: unknown service"):
        spec.load(write(tmp_path, inline))


def test_policy_for_unknown_service(tmp_path: Path) -> None:
    write(tmp_path, "zzz:\n  inbound: {}\n", "pol.yaml")
    with pytest.raises(spec.MeshFileError, match="/pol.yaml: zzz: policy for 'zzz': unknown service"):
        spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))


def test_filter_needs_typed_config(tmp_path: Path) -> None:
    write(tmp_path, "a:\n  inbound:\n    http_filters:\n    - name: envoy.filters.http.rbac\n",
          "pol.yaml")
    with pytest.raises(spec.MeshFileError, match=r"a\.inbound\.http_filters\[0\].*typed_config"):
        spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(spec.MeshFileError, match="not valid YAML"):
        spec.load(write(tmp_path, "services: [a: b"))
    with pytest.raises(spec.MeshFileError, match="cannot read"):
        spec.load(tmp_path / "absent.yaml")


def test_versions_of_one_service(tmp_path: Path) -> None:
    text = BASE + """  b-v2:
    service: b
    labels: {version: v2}
    command: [sleep, "100"]
    ports: [9000]
"""
    s = spec.load(write(tmp_path, text))
    assert [x.name for x in s.groups()["b"]] == ["b", "b-v2"]
    assert s.services["b-v2"].labels == {"app": "b", "version": "v2"}
    with pytest.raises(spec.MeshFileError, match=r"services\.b-v2\.ports: \[9001\] differ"):
        spec.load(write(tmp_path, text.replace("ports: [9000]\n", "ports: [9001]\n")
                        .replace("ports: [9001]\n", "ports: [9000]\n", 1)))


def test_service_given_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: the first service would vanish unsaid."""
    twice = BASE + '  a:\n    command: [sleep, "1"]\n    ports: [7000]\n'
    with pytest.raises(spec.MeshFileError, match=r"key 'a' given twice \(lines 4 and 11\)"):
        spec.load(write(tmp_path, twice))
    anchors = BASE.replace("  b:\n", "  b: &b\n") + "  c:\n    <<: *b\n    ports: [7000]\n"
    assert set(spec.load(write(tmp_path, anchors)).services) == {"a", "b", "c"}


ZIPKIN = ('{name: envoy.tracers.zipkin, typed_config: {"@type": '
          'type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: b, '
          'collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON}}')


def test_tracing_per_side(tmp_path: Path) -> None:
    write(tmp_path, "b:\n  outbound:\n    tracing: {random_sampling: {value: 30}}\n"
          f"  inbound:\n    tracing: {{overall_sampling: {{value: 12.5}}, provider: {ZIPKIN}}}\n"
          "a:\n  inbound: {routes: []}\n", "pol.yaml")
    s = spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))
    assert s.policies["b"]["outbound"]["tracing"] == {"random_sampling": {"value": 30}}
    assert s.policies["b"]["inbound"]["tracing"]["overall_sampling"] == {"value": 12.5}
    assert spec.zipkin_collector(s.policies["b"]["inbound"]["tracing"]) == "b"
    assert s.policies["a"]["inbound"]["tracing"] is None  # no `tracing:`: the side does not trace


@pytest.mark.parametrize("tracing, place, words", [
    ("{random_sampling: 30}", "b.outbound.tracing.random_sampling", "Envoy's Percent: {value: N}"),
    ("{client_sampling: {value: 101}}", "b.outbound.tracing.client_sampling", "N from 0 to 100"),
    ("{overall_sampling: {value: x}}", "b.outbound.tracing.overall_sampling", "from 0 to 100"),
    ("{random_samplin: {value: 3}}", "b.outbound.tracing", "keys among"),
    ("[1]", "b.outbound.tracing", "must be a mapping"),
    ("{provider: {name: envoy.tracers.opentelemetry, typed_config: {'@type': x}}}",
     "b.outbound.tracing.provider.typed_config", "only the Zipkin tracer"),
    ("{provider: {typed_config: {}}}", "b.outbound.tracing.provider", "needs `name`"),
    ("{provider: " + ZIPKIN.replace("collector_cluster: b, ", "") + "}",
     "b.outbound.tracing.provider.typed_config.collector_cluster", "missing"),
    ("{provider: " + ZIPKIN.replace("collector_endpoint: /api/v2/spans, ", "") + "}",
     "b.outbound.tracing.provider.typed_config.collector_endpoint", "Envoy refuses"),
    ("{provider: " + ZIPKIN.replace("/api/v2/spans", "''") + "}",
     "b.outbound.tracing.provider.typed_config.collector_endpoint", "path is needed"),
    ("{provider: " + ZIPKIN.replace("HTTP_JSON", "HTTP_PROTO") + "}",
     "b.outbound.tracing.provider.typed_config.collector_endpoint_version", "only HTTP_JSON"),
    ("{provider: " + ZIPKIN.replace("collector_cluster: b", "collector_cluster: ghost") + "}",
     "b.outbound.tracing.provider.typed_config.collector_cluster", "unknown service 'ghost'"),
])
def test_bad_tracing_names_the_place(tmp_path: Path, tracing: str, place: str, words: str) -> None:
    write(tmp_path, f"b:\n  outbound:\n    tracing: {tracing}\n", "pol.yaml")
    with pytest.raises(spec.MeshFileError) as exc:
        spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))
    msg = str(exc.value)
    assert f"/pol.yaml: {place}: " in msg and words in msg, msg


GATEWAY_MESH = Path(__file__).resolve().parent / "gateway_mesh" / "mesh.yaml"
GW = "gateways:\n  ingress:\n    labels: {istio: ingressgateway}\n    ports: [8080]\n"


def test_gateways_of_the_gateway_mesh() -> None:
    s = spec.load(GATEWAY_MESH)
    assert s.gateways["ingress"] == spec.Gateway("ingress", {"istio": "ingressgateway"}, (8080,))
    assert s.gateways["ingress"].pod == "ingress-0"


@pytest.mark.parametrize("gateways, place, words", [
    (GW.replace("ports: [8080]", "ports: [15000]"), "gateways.ingress.ports",
     "clashes with a sidecar port"),
    (GW.replace("ports: [8080]", "ports: [0]"), "gateways.ingress.ports", "not a TCP port"),
    (GW.replace("    ports: [8080]\n", ""), "gateways.ingress.ports", "non-empty list"),
    (GW.replace("{istio: ingressgateway}", "{}"), "gateways.ingress.labels", "non-empty mapping"),
    (GW.replace("{istio: ingressgateway}", "[istio]"), "gateways.ingress.labels", "mapping"),
    (GW + "    replicas: 2\n", "gateways.ingress", "unknown key(s) ['replicas']"),
    (GW.replace("  ingress:", "  a:"), "gateways.a", "name taken by a service or pod"),
    (GW.replace("  ingress:", "  Bad_gw:"), "gateways.Bad_gw", "gateway name must match"),
    ("gateways: [ingress]\n", "gateways", "non-empty mapping"),
    (GW + "  ingress-0:\n    labels: {a: b}\n    ports: [80]\n", "gateways.ingress-0",
     "name taken by a service or pod"),
])
def test_bad_gateway_names_the_place(tmp_path: Path, gateways: str, place: str, words: str) -> None:
    (tmp_path / "istio").mkdir()
    with pytest.raises(spec.MeshFileError) as exc:
        spec.load(write(tmp_path, "istio_policies: istio\n" + BASE + gateways))
    msg = str(exc.value)
    assert f"mesh.yaml: {place}" in msg and words in msg, msg


def test_gateway_needs_istio_policies(tmp_path: Path) -> None:
    with pytest.raises(spec.MeshFileError) as exc:
        spec.load(write(tmp_path, BASE + GW))
    assert "mesh.yaml: gateways: a gateway needs `istio_policies:`" in str(exc.value)
