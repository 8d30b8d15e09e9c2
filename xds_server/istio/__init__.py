"""Istio / Gateway API importer: istiod's sidecar config generation, offline.

Entry points (who calls what):

* `load(policies, mesh_file=None, k8s=None)` -> `Mesh` (objects + registry);
  called by `xds_server.istio.source` (serve) and the split reader.
* `generate(mesh, node_id, labels)` -> Envoy JSON dicts by type URL for one
  sidecar, or for one Istio gateway (`router~...`, xds_server.istio.gateway).
* `messages.to_messages(...)` -> betterproto2 messages for the ADS server.

Unsupported fields are reported in `mesh.objs.warnings`, one line each,
`KIND NS/NAME: field.path: problem`.
"""

from __future__ import annotations

from pathlib import Path

from . import gateway, registry
from .objects import ObjectSet, load_path
from .sidecar import Mesh, generate, mesh_from

__all__ = ["Mesh", "generate", "load"]


def load(policies: str | Path, mesh_file: str | Path | None = None,
         k8s: str | Path | None = None, inbound_address: str = "127.0.0.1",
         capture_ports: tuple[int, int] = (15001, 15006)) -> Mesh:
    """Read policies (and services/endpoints) into a Mesh; ValueError names a bad file."""
    objs = load_path(policies)
    if k8s is not None and Path(k8s).resolve() != Path(policies).resolve():
        load_path(k8s, objs)
    if mesh_file is not None:
        reg = registry.from_mesh_file(mesh_file)
        registry.from_k8s(objs, reg)
    else:
        reg = registry.from_k8s(objs)
    registry.add_service_entries(objs, reg)
    mesh = mesh_from(objs, reg, inbound_address)
    gateway.check_gateways(mesh)
    mesh.outbound_port, mesh.inbound_port = capture_ports
    return mesh


def load_objects(path: str | Path) -> ObjectSet:
    return load_path(path)
