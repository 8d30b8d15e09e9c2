"""Policy files -> Envoy resources, one reader per format.

Called by `fastpath.coverage` (`l7fp split FILE|DIR...`); owned by the split.

READERS is the list of format readers, tried in order on every file. A reader is
a callable ``reader(path) -> list[Document]``: it returns an empty list when the
file is not in its format, and one Document per policy set it finds otherwise
(a Document with ``error`` set when the file is in its format but can't be read).
To add a format (e.g. the Istio / Gateway API importer), append its reader:

    READERS.append(my_reader)

Readers here:

* ``envoy-static``: Envoy bootstraps (``static_resources``), also when embedded
  as a string in a Kubernetes ConfigMap;
* ``envoy-xds``: xDS resource files (top-level ``resources:`` with ``@type``),
  the format of `l7fp serve --config`, and CiliumEnvoyConfig (``spec.resources``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastpath import envoy_model as em
from fastpath import input_checks as checks
from fastpath.classify_delay import runtime_of
from fastpath.inputs_walk import walk
from xds_server.istio.reader import split_reader as read_istio
from xds_server.sources import cilium, cilium_files


@dataclass
class Document:
    """One policy set read from ``path``: ``resources`` maps type URL -> messages."""

    path: str
    format: str
    resources: dict[str, list[Any]] = field(default_factory=dict)
    error: str | None = None  # the file is in this format but could not be read
    skipped: list[str] = field(default_factory=list)  # resources that failed, with why
    # runtime layers of a bootstrap that can override fault percentages (classify_delay.runtime_of)
    runtime: str = ""
    # Listeners/route configs that failed to parse, raw, with why: the split
    # still counts their routes (as ENVOY), so coverage keeps its denominator.
    unread: list[tuple[str, Any, str]] = field(default_factory=list)
    # Extension configs kept opaque for Envoy (types/fields L7FP's proto library lacks)
    opaque: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # mistakes Envoy accepts (fastpath.input_checks)
    rejected: list[str] = field(default_factory=list)  # what makes Envoy reject the file
    # EDS service name -> why no endpoints (CiliumEnvoyConfig: fastpath.inputs_cilium)
    eds_missing: dict[str, str] = field(default_factory=dict)
    # "mesh": the sidecars apply these routes (L7FP's kernel path is on mesh clients'
    # sockets); "gateway": routes bound only to gateways, which the gateway's Envoy runs
    placement: str = "mesh"
    # Istio importer: the inbound side of the pod at an address as Envoy JSON (type URL
    # -> resource dicts), for the verdicts that know the destinations
    # (fastpath.inbound_verdict; coverage parses each distinct one once); None: unknown pod
    inbound_of: Callable[[str], dict[str, list[dict[str, Any]]] | None] | None = None

    @property
    def unusable(self) -> bool:
        """Envoy could not run this file (not YAML, or it rejects a resource)."""
        return bool(self.error or self.rejected
                    or any(checks.ENVOY_REJECTS in s for s in self.skipped))


Reader = Callable[[Path], list[Document]]


@functools.lru_cache(maxsize=64)
def load_yaml(path: Path) -> tuple[Any, ...]:
    """All YAML documents of ``path`` (JSON is YAML); raises yaml.YAMLError."""
    with open(path, encoding="utf-8") as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def clear_caches() -> None:
    """Forget every file read so far: `load_yaml` and the CiliumEnvoyConfig
    registry per directory (fastpath.inputs_cilium). Called at the start of
    each split run (coverage.analyse), so that a process running several (the
    tests, a caller of analyse) reads the files as they are now, not as the
    first run saw them; within one run each file is read once."""
    from fastpath import inputs_cilium

    load_yaml.cache_clear()
    inputs_cilium.clear_caches()


def _docs(path: Path) -> Iterator[Any]:
    """YAML documents of ``path``, plus YAML embedded in ConfigMap data strings."""
    try:
        docs = load_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return
    for d in docs:
        yield d
        if isinstance(d, dict) and d.get("kind") == "ConfigMap":
            for text in (d.get("data") or {}).values():
                try:
                    yield from (x for x in yaml.safe_load_all(str(text)) if x is not None)
                except yaml.YAMLError:
                    continue


def _add(doc: Document, type_url: str, data: Any) -> None:
    if em.message_class(type_url) is None:
        return  # other resource types (runtime, secrets of other kinds) don't carry L7 policy
    try:
        msg, opaque = em.parse_with_notes(type_url, data)
    except em.ResourceError as e:
        doc.skipped.append(str(e))
        if type_url in (em.LISTENER, em.ROUTE):
            doc.unread.append((type_url, data, str(e)))
        return
    doc.resources.setdefault(type_url, []).append(msg)
    label = em.resource_label(data)
    doc.opaque += [f"{em.type_name(type_url).rsplit('.', 1)[-1]} {label}: {o}" for o in opaque]
    hcm = [o for o in opaque if o.type_name == em.HCM]
    if type_url == em.LISTENER and hcm:  # its routes are not read: count them, ENVOY, saying why
        doc.unread.append((type_url, data, f"{label}: {hcm[0]}"))


def read_envoy_static(path: Path) -> list[Document]:
    """Envoy bootstrap files: ``static_resources`` listeners and clusters."""
    out = []
    for d in _docs(path):
        if not isinstance(d, dict):
            continue
        sr = d.get("static_resources", d.get("staticResources"))
        if not isinstance(sr, dict):
            continue
        doc = Document(str(path), "envoy-static", runtime=runtime_of(d))
        doc.rejected += checks.bootstrap_problems(d)
        listeners = _listeners(doc, _list(sr.get("listeners")))
        doc.rejected += checks.unknown_clusters(listeners, _list(sr.get("clusters")))
        for url, items in ((em.CLUSTER, _list(sr.get("clusters"))), (em.SECRET, _list(sr.get("secrets")))):
            for item in items:
                _add(doc, url, item)
        out.append(doc)
    return out


def read_envoy_xds(path: Path) -> list[Document]:
    """xDS resource files and CiliumEnvoyConfig: lists of ``@type``-tagged resources."""
    out = []
    for d in _docs(path):
        if not isinstance(d, dict):
            continue
        cec = cilium.is_cec(d)
        spec = d.get("spec") if cec else d
        items = spec.get("resources") if isinstance(spec, dict) else None
        typed = [i for i in items if isinstance(i, dict) and "@type" in i] if isinstance(items, list) else []
        if not typed:
            continue
        doc = Document(str(path), "envoy-xds")
        if cec:  # as cilium-agent hands them to Envoy, the way `l7fp serve` serves them
            typed = cilium_files.prepare(d)
        _listeners(doc, [i for i in typed if i["@type"] == em.LISTENER])
        for item in [i for i in typed if i["@type"] != em.LISTENER]:
            _add(doc, item["@type"], item)
        if cec:
            _add_cilium_endpoints(doc, d, [i for i in typed if i["@type"] == em.CLUSTER], path)
        out.append(doc)
    return out


def _add_cilium_endpoints(doc: Document, cec: dict[str, Any], clusters: list[dict[str, Any]],
                          path: Path) -> None:
    """The assignments cilium-agent would publish for the CEC's Services
    (fastpath.inputs_cilium); ``clusters``: the CEC's, qualified (cilium_files.prepare)."""
    from fastpath.inputs_cilium import endpoints_for

    try:
        clas, doc.eds_missing, warnings = endpoints_for(cec, clusters, path, load_yaml)
    except ValueError as e:
        doc.rejected.append(str(e))
        return
    doc.notes += warnings
    for cla in clas:
        _add(doc, em.ENDPOINT, cla)


def _list(value: Any) -> list[Any]:
    """A YAML list, or one value where Envoy also takes one (protojson)."""
    return value if isinstance(value, list) else [] if value is None else [value]


def _listeners(doc: Document, items: list[Any]) -> list[Any]:
    """Add the listeners Envoy would run to ``doc``; say the others, and mistakes, there.
    Returns the listeners kept (raw)."""
    drop, rejected, notes = checks.listener_problems(items)
    doc.notes += notes
    why = dict(reversed(rejected))  # the first problem of each listener
    kept = []
    for i, item in enumerate(items):
        if i in why and _parses(item):  # else Envoy's JSON error comes first: _add says it
            doc.rejected += [line for j, line in rejected if j == i]
            doc.unread.append((em.LISTENER, item, why[i]))  # its routes count, as ENVOY
        elif i not in drop or i in why:
            _add(doc, em.LISTENER, item)
            kept.append(item)
    return kept


def _parses(item: Any) -> bool:
    try:
        em.parse(em.LISTENER, item)
    except em.ResourceError:
        return False
    return True


READERS: list[Reader] = [read_envoy_static, read_envoy_xds, read_istio]


def files(paths: list[str]) -> list[Path]:
    """The files named, and the *.yaml/*.yml/*.json files under the directories named
    (fastpath.inputs_walk: not into /proc, /sys, ...; not dying on a file that vanishes)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():  # the directories it cannot list: inputs_walk.walk says them (coverage)
            out += walk(p).files
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def read(path: Path) -> list[Document]:
    """Every Document of ``path`` from every reader; a file no reader knows gives [];
    a file that cannot be read, one Document saying why (``error``)."""
    try:
        load_yaml(path)
    except OSError as e:  # unreadable (I/O error, permissions) or gone since the walk listed it
        return [Document(str(path), "unrecognized", error=f"cannot read: {e.strerror or e}")]
    except (yaml.YAMLError, UnicodeDecodeError):
        pass  # some readers take what YAML does not (or say why below)
    docs: list[Document] = []
    for reader in READERS:
        docs += reader(path)
    if not docs:
        try:
            load_yaml(path)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            return [Document(str(path), "unrecognized", error=f"not YAML/JSON: {checks.yaml_problem(e)}")]
    return docs
