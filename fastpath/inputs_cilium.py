"""`l7fp split` on a CiliumEnvoyConfig: the endpoints cilium-agent would give its clusters.

Called by `fastpath.inputs.read_envoy_xds` for each CiliumEnvoyConfig /
CiliumClusterwideEnvoyConfig document; owned by the split. The Services come
from the Kubernetes Service/EndpointSlice/Pod objects of the same file and of
the other files of its directory (the input a user hands `l7fp split`), read
with the Istio importer's registry; the assignments are those of
`xds_server.sources.cilium` (cilium-agent's naming and port selection). An EDS
cluster that still has none keeps the ENVOY reason, with why
(`Document.eds_missing`, passed to the classifier in `KernelCaps.eds_missing`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from xds_server.sources import cilium

SUFFIXES = (".yaml", ".yml", ".json")


def endpoints_for(cec: Mapping[str, Any], path: Path, load: Callable[[Path], tuple[Any, ...]]
                  ) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """(assignments, EDS service name -> why it has none, registry warnings) for one
    CEC document of ``path``; ``load`` reads a file's YAML documents (cached by the caller)."""
    clusters = [r for r in cilium.resources(cec) if r["@type"] == cilium.CLUSTER]
    return cilium.assignments(cilium.service_refs(cec), _registry_docs(path, load), clusters,
                              str(path.parent))


def _registry_docs(path: Path, load: Callable[[Path], tuple[Any, ...]]) -> list[Any]:
    """Service/EndpointSlice/Pod documents of ``path`` and of its directory's other files."""
    out: list[Any] = []
    for f in (path, *(p for p in _siblings(path.parent) if p != path)):
        try:
            out += [d for d in load(f) if cilium.is_registry_object(d)]
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # another file that is not YAML: reported on its own
    return out


@functools.lru_cache(maxsize=32)
def _siblings(directory: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in directory.iterdir()
                        if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith(".")))
