"""`l7fp split` on a CiliumEnvoyConfig: the endpoints cilium-agent would give its clusters.

Called by `fastpath.inputs.read_envoy_xds` for each CiliumEnvoyConfig /
CiliumClusterwideEnvoyConfig document; owned by the split. The Services come
from the Kubernetes Service/EndpointSlice/Pod objects of the same file and of
the other files of its directory (the input a user hands `l7fp split`), read
with the Istio importer's registry, built once per directory and split run
(as cilium-agent sees one cluster state; `clear_caches` at each run's start);
the assignments are those of `xds_server.sources.cilium` (cilium-agent's
naming and port selection). An EDS
cluster that still has none keeps the ENVOY reason, with why
(`Document.eds_missing`, passed to the classifier in `KernelCaps.eds_missing`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from xds_server.istio.registry import Registry
from xds_server.sources import cilium

SUFFIXES = (".yaml", ".yml", ".json")
Load = Callable[[Path], tuple[Any, ...]]


def endpoints_for(cec: Mapping[str, Any], clusters: list[dict[str, Any]], path: Path, load: Load
                  ) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """(assignments, EDS service name -> why it has none, registry warnings) for one
    CEC document of ``path``; ``clusters``: its clusters as cilium-agent qualifies
    them (cilium_files.prepare: the EDS names Envoy asks for); ``load`` reads a
    file's YAML documents (cached by the caller)."""
    reg, warnings = _registry(path.parent, None if path in _siblings(path.parent) else path, load)
    clas, missing = cilium.assignments(cilium.service_refs(cec), reg, clusters)
    return clas, missing, list(warnings)


def clear_caches() -> None:
    """inputs.clear_caches, at each split run's start: the registries and
    listings below are the files as that run found them."""
    _registry.cache_clear()
    _siblings.cache_clear()


@functools.lru_cache(maxsize=32)
def _registry(directory: Path, extra: Path | None, load: Load) -> tuple[Registry, tuple[str, ...]]:
    """The registry of the Service/EndpointSlice/Pod documents of ``directory``'s
    files (and of ``extra``, a file named on the command line that is not one of
    them), and its warnings: once per directory, for all its CEC documents
    (cilium.assignments only reads it)."""
    docs: list[Any] = []
    for f in (*((extra,) if extra else ()), *_siblings(directory)):
        try:
            docs += [d for d in load(f) if cilium.is_registry_object(d)]
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # another file that is not YAML: reported on its own
    reg, warnings = cilium.registry(docs, str(directory))
    return reg, tuple(warnings)


@functools.lru_cache(maxsize=32)
def _siblings(directory: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in directory.iterdir()
                        if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith(".")))
