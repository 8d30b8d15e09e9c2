"""Kubernetes-style YAML objects: loading, identity, and field warnings.

Called by `xds_server.istio.importer` (and the split reader) to turn a policy
directory or file into `Obj` records grouped by kind. Every field the importer
does not translate is reported through `Warnings` naming the object and the
field path; nothing is dropped silently. This module owns only parsing; it
does not know Envoy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server import yaml_errors

log = logging.getLogger(__name__)

# kind -> API groups we accept for it (versions are not checked: v1alpha3,
# v1beta1 and v1 carry the same fields for what we translate).
KNOWN_KINDS: dict[str, tuple[str, ...]] = {
    "VirtualService": ("networking.istio.io",),
    "DestinationRule": ("networking.istio.io",),
    "ServiceEntry": ("networking.istio.io",),
    "Sidecar": ("networking.istio.io",),
    "Gateway": ("networking.istio.io", "gateway.networking.k8s.io"),
    "AuthorizationPolicy": ("security.istio.io",),
    "PeerAuthentication": ("security.istio.io",),
    "HTTPRoute": ("gateway.networking.k8s.io",),
    "GRPCRoute": ("gateway.networking.k8s.io",),
    "Service": ("",),
    "EndpointSlice": ("discovery.k8s.io",),
    "Pod": ("",),
}

# Kinds that carry no sidecar L7 policy; read without a warning.
IGNORED_KINDS = frozenset({
    "Deployment", "ServiceAccount", "Namespace", "ConfigMap", "Secret",
    "GatewayClass", "ReferenceGrant", "StatefulSet", "DaemonSet", "ReplicaSet",
})

DEFAULT_NAMESPACE = "default"
MESH_CONFIG_NAMESPACE = "istio-system"  # ConfigMap istio-system/istio holds Istio's MeshConfig
MESH_CONFIG_FIELDS = {"defaultHttpRetryPolicy", "pathNormalization"}  # what the importer reads; the rest is not L7 policy


class Warnings:
    """Collects `KIND NS/NAME: field: problem` lines; also logs each once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, obj: Obj | None, path: str, problem: str) -> None:
        where = obj.ref if obj is not None else "-"
        line = f"{where}: {path}: {problem}" if path else f"{where}: {problem}"
        if line not in self.lines:
            self.lines.append(line)
            log.warning("%s", line)

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)


@dataclass(frozen=True)
class Obj:
    """One Kubernetes object as read from YAML."""

    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]
    raw: Mapping[str, Any]
    source: str = ""

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def labels(self) -> Mapping[str, str]:
        meta = self.raw.get("metadata") or {}
        return meta.get("labels") or {}


@dataclass
class ObjectSet:
    """All objects of a policy directory, by kind, in file order."""

    by_kind: dict[str, list[Obj]] = field(default_factory=dict)
    warnings: Warnings = field(default_factory=Warnings)

    def of(self, kind: str) -> list[Obj]:
        return self.by_kind.get(kind, [])

    def add(self, obj: Obj) -> None:
        self.by_kind.setdefault(obj.kind, []).append(obj)

    def count(self) -> int:
        return sum(len(v) for v in self.by_kind.values())


def check_fields(
    warnings: Warnings, obj: Obj | None, path: str, value: Any, known: Iterable[str]
) -> Mapping[str, Any]:
    """Warn on every key of mapping `value` not in `known`; return the mapping.

    A non-mapping value is reported as malformed and treated as empty.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        warnings.add(obj, path, f"expected a mapping, got {type(value).__name__}; ignored")
        return {}
    allowed = set(known)
    for key in value:
        if key not in allowed:
            sub = f"{path}.{key}" if path else str(key)
            warnings.add(obj, sub, "unsupported field, ignored")
    return value


def exported_to(obj: Obj, namespace: str) -> bool:
    """Istio `exportTo`: is `obj` visible to a proxy in `namespace`? (absent = everywhere)"""
    export = obj.spec.get("exportTo")
    if not export:
        return True
    return any(e == "*" or e == namespace or (e == "." and obj.namespace == namespace)
               for e in map(str, export))


def as_list(warnings: Warnings, obj: Obj, path: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        warnings.add(obj, path, f"expected a list, got {type(value).__name__}; ignored")
        return []
    return value


def _group(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def parse_documents(docs: Iterable[Any], source: str, out: ObjectSet) -> None:
    """Add every Kubernetes object of `docs` (YAML documents) to `out`."""
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            out.warnings.add(None, source, "document is not a mapping; ignored")
            continue
        if doc.get("kind") == "List":
            parse_documents(doc.get("items") or [], source, out)
            continue
        _parse_one(doc, source, out)


def _parse_one(doc: Mapping[str, Any], source: str, out: ObjectSet) -> None:
    kind = str(doc.get("kind") or "")
    meta = doc.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or DEFAULT_NAMESPACE)
    group = _group(str(doc.get("apiVersion") or ""))
    obj = Obj(kind, name, namespace, doc.get("spec") or {}, doc, source)
    if kind == "ConfigMap" and name == "istio" and namespace == MESH_CONFIG_NAMESPACE:
        out.add(Obj("MeshConfig", name, namespace, _mesh_config(doc, out.warnings, obj), doc, source))
        return
    if kind in IGNORED_KINDS:
        return
    groups = KNOWN_KINDS.get(kind)
    if groups is None or group not in groups:
        out.warnings.add(obj, "", f"kind {kind!r} (apiVersion {doc.get('apiVersion')!r}) "
                         f"in {source} is not supported; object ignored")
        return
    if not name:
        out.warnings.add(obj, "metadata.name", f"missing in {source}; object ignored")
        return
    out.add(obj)


_TEMPLATE_LINE = re.compile(r"^\s*\{\{.*\}\}\s*$")
_TEMPLATE = re.compile(r"\{\{.*?\}\}")


def strip_helm(text: str) -> str:
    """Drop Helm directive lines and blank inline `{{ }}` (both if/else branches stay)."""
    lines = [ln for ln in text.splitlines() if not _TEMPLATE_LINE.match(ln)]
    return "\n".join(_TEMPLATE.sub("1", ln) for ln in lines)


def _mesh_config(doc: Mapping[str, Any], warnings: Warnings, obj: Obj) -> Mapping[str, Any]:
    """The `mesh` key of ConfigMap istio-system/istio (MeshConfig YAML)."""
    text = (doc.get("data") or {}).get("mesh") or ""
    try:
        mesh = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        warnings.add(obj, "data.mesh", f"not YAML ({exc}); mesh config ignored")
        return {}
    if not isinstance(mesh, Mapping):
        warnings.add(obj, "data.mesh", "not a mapping; mesh config ignored")
        return {}
    return mesh


def mesh_config(objs: ObjectSet) -> Mapping[str, Any]:
    """Istio MeshConfig from the policies (ConfigMap istio-system/istio), or {}."""
    found = objs.of("MeshConfig")
    return found[-1].spec if found else {}


def load_path(path: str | Path, out: ObjectSet | None = None, helm: bool = False) -> ObjectSet:
    """Read a YAML file, or every *.yaml/*.yml/*.json under a directory.

    `helm=True` (split coverage only) first strips Helm template directives.

    Raises ValueError naming the file on YAML syntax errors: a broken file
    must not be half-applied.
    """
    out = out if out is not None else ObjectSet()
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or directory")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for f in files:
        try:
            text = yaml_errors.read_text(f)
            docs = list(yaml.safe_load_all(strip_helm(text) if helm and "{{" in text else text))
        except yaml.YAMLError as exc:
            raise ValueError(f"{f}: invalid YAML: {yaml_errors.problem(exc)}") from exc
        parse_documents(docs, str(f), out)
    return out
