"""`l7fp serve --config DIR` with CiliumEnvoyConfig and Kubernetes Service files.

Called by `xds_server.sources.files` for a file whose YAML documents are
Kubernetes objects (`apiVersion` + `kind`), and once per directory load for the
endpoints. Prepares each CEC's `spec.resources` as cilium-agent does before it
hands them to its Envoy (pkg/ciliumenvoyconfig, `ParseResources`):

* names qualified: listeners and route configs always become `NS/CEC/NAME`
  (unless already in the CEC's namespace), clusters and assignments only when
  their name has no `/` (so `default/echo` stays the Service's EDS cluster);
  the references follow (`rds.route_config_name`, route `cluster`,
  `weighted_clusters`, `request_mirror_policies`);
* an HCM's `rds` and an EDS cluster without a config source get ADS;
* a listener without an address gets 127.0.0.1:PORT (`cilium.with_address`:
  cilium-agent binds its L7 load-balancing listeners to a proxy port on
  localhost; the port is logged).

The assignments of the Services the CECs name (`cilium.load_assignments`, over
the Service/EndpointSlice/Pod objects of the whole directory) are served as one
more file, `(cilium-agent endpoints)`. Owns nothing else.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import betterproto2

from xds_server import resources as res
from xds_server.istio.objects import IGNORED_KINDS
from xds_server.sources import cilium

log = logging.getLogger(__name__)
ADS = {"ads": {}, "resource_api_version": "V3"}
ENDPOINTS_FILE = "(cilium-agent endpoints)"


@dataclass(frozen=True)
class KubeInput:
    """What one Kubernetes file gives the directory's endpoint generation."""

    registry_docs: tuple[Any, ...] = ()  # Service/EndpointSlice/Pod documents
    refs: tuple[cilium.ServiceRef, ...] = ()  # the Services its CECs name
    clusters: tuple[Mapping[str, Any], ...] = ()  # its CECs' clusters (qualified, raw)


def is_kubernetes(docs: list[Any]) -> bool:
    return any(isinstance(d, Mapping) and "apiVersion" in d and "kind" in d for d in docs)


def read(docs: list[Any], rel: str) -> tuple[dict[str, list[betterproto2.Message]], KubeInput, list[str]]:
    """Resources by type URL, the file's KubeInput, and `rel: ...: problem` lines."""
    by_type: dict[str, list[betterproto2.Message]] = {}
    problems: list[str] = []
    kube: list[Any] = []
    refs: list[cilium.ServiceRef] = []
    clusters: list[Mapping[str, Any]] = []
    for i, d in enumerate(_flatten(docs)):
        where = f"{rel}: document {i + 1}"
        if cilium.is_registry_object(d):
            kube.append(d)
        elif cilium.is_cec(d):
            try:
                refs += cilium.service_refs(d)
            except ValueError as exc:
                problems.append(f"{rel}: {exc}")
                continue
            items = prepare(d)
            _log_addresses(d, items)
            clusters += [r for r in items if r["@type"] == cilium.CLUSTER]
            problems += _parse(items, f"{rel}: {cilium.cec_name(d)}", by_type)
        elif not (isinstance(d, Mapping) and d.get("kind") in IGNORED_KINDS):
            kind = d.get("kind") if isinstance(d, Mapping) else type(d).__name__
            problems.append(f"{where}: kind {kind!r} is not read here (Envoy resource files, "
                            "CiliumEnvoyConfig, CiliumClusterwideEnvoyConfig, Service, EndpointSlice, Pod)")
    return by_type, KubeInput(tuple(kube), tuple(refs), tuple(clusters)), problems


def _log_addresses(cec: Mapping[str, Any], items: list[dict[str, Any]]) -> None:
    """Say where a listener without an address listens (`l7fp serve`'s log)."""
    for raw, item in zip(cilium.resources(cec), items, strict=True):
        if item["@type"] == cilium.LISTENER and raw.get("address") is None and item.get("address"):
            port = item["address"]["socket_address"]["port_value"]
            log.info("%s: listener %r has no address: bound to 127.0.0.1:%d (a proxy port, "
                     "as cilium-agent does)", cilium.cec_name(cec), item.get("name"), port)


def _flatten(docs: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for d in docs:
        if isinstance(d, Mapping) and d.get("kind") == "List":
            out += _flatten(d.get("items") or [])
        elif d is not None:
            out.append(d)
    return out


def _parse(items: list[dict[str, Any]], where: str, by_type: dict[str, list[betterproto2.Message]]) -> list[str]:
    problems = []
    for i, item in enumerate(items):
        try:
            by_type.setdefault(item["@type"], []).append(res.parse_resource(item, f"spec.resources[{i}]"))
        except res.ResourceError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def endpoints(inputs: Iterable[KubeInput], directory: str) -> dict[str, list[betterproto2.Message]]:
    """The assignments cilium-agent publishes for the Services the CECs name;
    logs each EDS cluster that gets none, with why."""
    inputs = list(inputs)
    reg, warnings = cilium.registry([d for k in inputs for d in k.registry_docs], directory)
    clas, why_missing = cilium.assignments([r for k in inputs for r in k.refs], reg,
                                           [c for k in inputs for c in k.clusters])
    for w in warnings:
        log.warning("%s: %s", directory, w)
    for name, why in sorted(why_missing.items()):
        log.warning("%s: EDS cluster %r gets no endpoints, as from cilium-agent: %s", directory, name, why)
    return {cilium.ENDPOINT: [res.parse_resource(c, ENDPOINTS_FILE) for c in clas]} if clas else {}


def prepare(cec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`spec.resources` as cilium-agent gives them to Envoy (see the module doc)."""
    q = _Qualifier(cilium.cec_namespace(cec), str((cec.get("metadata") or {}).get("name") or ""))
    out = []
    for item in copy.deepcopy(cilium.resources(cec)):
        kind = item["@type"]
        if kind == cilium.LISTENER:
            item = q.listener(item)
        elif kind == cilium.ROUTE:
            q.route_config(item)
            _set(item, "name", q.forced(_get(item, "name")))
        elif kind == cilium.CLUSTER:
            q.cluster(item)
        elif kind == cilium.ENDPOINT:
            _set(item, "cluster_name", q.plain(_get(item, "cluster_name")))
        out.append(item)
    return out


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p.title() for p in rest)


def _get(d: Mapping[str, Any], key: str) -> Any:
    """A field by its snake_case name, written in either case."""
    return d.get(key, d.get(_camel(key)))


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        return
    d[_camel(key) if _camel(key) in d else key] = value


class _Qualifier:
    """cilium's ResourceQualifiedName for one CEC (pkg/policy/api)."""

    def __init__(self, namespace: str, cec: str) -> None:
        self.ns, self.cec = namespace, cec

    def plain(self, name: Any) -> Any:
        return name if not name or "/" in str(name) else f"{self.ns}/{self.cec}/{name}"

    def forced(self, name: Any) -> Any:
        if not name or str(name).startswith(f"{self.ns}/"):
            return name
        return f"{self.ns}/{self.cec}/{name}"

    def listener(self, item: dict[str, Any]) -> dict[str, Any]:
        for fc in _get(item, "filter_chains") or []:
            for f in _get(fc, "filters") or []:
                tc = _get(f, "typed_config") or {}
                if str(tc.get("@type", "")).endswith("HttpConnectionManager"):
                    self.hcm(tc)
        _set(item, "name", self.forced(_get(item, "name")))
        return cilium.with_address(item, str(_get(item, "name")))

    def hcm(self, tc: dict[str, Any]) -> None:
        rds = _get(tc, "rds")
        if isinstance(rds, dict):
            _set(rds, "route_config_name", self.forced(_get(rds, "route_config_name")))
            if _get(rds, "config_source") is None:
                rds["config_source"] = dict(ADS)
        inline = _get(tc, "route_config")
        if isinstance(inline, dict):
            self.route_config(inline)

    def route_config(self, rc: dict[str, Any]) -> None:
        for vh in _get(rc, "virtual_hosts") or []:
            for r in _get(vh, "routes") or []:
                action = _get(r, "route")
                if isinstance(action, dict):
                    self.action(action)

    def action(self, a: dict[str, Any]) -> None:
        _set(a, "cluster", self.plain(_get(a, "cluster")))
        for wc in _get(_get(a, "weighted_clusters") or {}, "clusters") or []:
            _set(wc, "name", self.plain(_get(wc, "name")))
        for m in _get(a, "request_mirror_policies") or []:
            _set(m, "cluster", self.plain(_get(m, "cluster")))

    def cluster(self, c: dict[str, Any]) -> None:
        _set(c, "name", self.plain(_get(c, "name")))
        if c.get("type") == "EDS":
            eds = _get(c, "eds_cluster_config")
            if eds is None:
                eds = c["eds_cluster_config"] = {}
            if _get(eds, "eds_config") is None:
                eds["eds_config"] = dict(ADS)
        la = _get(c, "load_assignment")
        if isinstance(la, dict):
            _set(la, "cluster_name", self.plain(_get(la, "cluster_name")))
