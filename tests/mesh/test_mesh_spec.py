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
    with pytest.raises(spec.MeshFileError, match=r"b\.policy\.outbound\.routes\[0\]\.route\.cluster.*ghost"):
        spec.load(write(tmp_path, BASE + "policies: pol.yaml\n"))


def test_policy_for_unknown_service(tmp_path: Path) -> None:
    write(tmp_path, "zzz:\n  inbound: {}\n", "pol.yaml")
    with pytest.raises(spec.MeshFileError, match="policy for 'zzz': unknown service"):
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
