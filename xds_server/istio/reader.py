"""One Istio / Gateway API file -> Envoy resources, for `l7fp split` and coverage.

Called by the split's READERS list (fastpath.inputs) with a single file that
carries policy but usually no registry. Services and pods the file refers to
but does not define are synthesized (one pod per DestinationRule subset, one
pod per AuthorizationPolicy selector, addresses from 198.18.255.0/24) so that
every route and authorization rule of the file reaches the split. Routes bound
to gateways only (skipped for sidecars in `serve`) are read too, as a policy
set of their own (`read_placed`: placement "gateway"), so the split can say
they run on the gateway's Envoy, not on a mesh client's kernel path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gateway_api
from .messages import to_messages
from .objects import KNOWN_KINDS, Obj, ObjectSet, load_path
from .registry import Endpoint, Port, Registry, Service, Workload, from_k8s
from .sidecar import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Mesh,
    apply_mesh_config,
    generate,
    inbound_side,
)

POLICY_KINDS = ("VirtualService", "DestinationRule", "AuthorizationPolicy", "HTTPRoute",
                "GRPCRoute", "ServiceEntry", "Sidecar", "PeerAuthentication")


def can_read(path: str | Path) -> bool:
    """True when the YAML file holds at least one Istio / Gateway API policy object."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return False
    text = p.read_text(errors="replace")
    return any(f"kind: {k}" in text or f'kind: "{k}"' in text for k in POLICY_KINDS)


def read_file(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Envoy JSON dicts by type URL for every sidecar the file's policies touch."""
    objs = load_path(path, helm=True)
    return read_objects(objs)


def read_objects(objs: ObjectSet) -> dict[str, list[dict[str, Any]]]:
    """Every node's resources merged, gateway-bound routes applied as if by the
    client's sidecar (the importer's tests; `l7fp split` reads `read_placed`)."""
    reg, client, pods = _registry(objs)
    extra = gateway_api.as_virtual_services(objs, reg, mesh_only=False)
    mesh = Mesh(objs, reg, extra_routes=extra, gateway_routes=True, policy_only=True)
    apply_mesh_config(mesh)
    return _merged(mesh, client, [client, *pods])


@dataclass
class PolicySet:
    """One placement's share of a file's policies, for `l7fp split`.

    `placement` "mesh": what the sidecars apply (the client's outbound routes,
    the policy pods' inbound RBAC); "gateway": the routes bound to gateways
    only (Istio `gateways:` without `mesh`, Gateway API Gateway parents),
    generated as if the client's sidecar ran them, to say what they need.
    `inbound_of(ip)`: the inbound side (virtualInbound listener, inbound
    clusters) the pod at `ip` gets from istiod, or None when no pod of the
    file's registry has that address."""

    placement: str
    resources: dict[str, list[dict[str, Any]]]
    inbound_of: Callable[[str], dict[str, list[dict[str, Any]]] | None]


def read_placed(objs: ObjectSet) -> list[PolicySet]:
    """The file's "mesh" set, and its "gateway" set when it has gateway-only routes."""
    reg, client, pods = _registry(objs)
    inbound = _inbound_of(objs, reg)
    out = []
    for placement in ("mesh", "gateway"):
        extra = gateway_api.as_virtual_services(objs, reg, mesh_only=False, placement=placement)
        mesh = Mesh(objs, reg, extra_routes=extra, gateway_routes=True, policy_only=True,
                    placement=placement)
        apply_mesh_config(mesh)
        # the policy pods' inbound RBAC is the mesh's: counted once
        res = _merged(mesh, client, [client, *pods] if placement == "mesh" else [client])
        if placement == "mesh" or any(vh.get("routes") for rc in res[ROUTE]
                                      for vh in rc.get("virtualHosts") or []):
            out.append(PolicySet(placement, res, inbound))
    return out


def _inbound_of(objs: ObjectSet, reg: Registry) -> Callable[[str], dict[str, list[dict[str, Any]]] | None]:
    """`PolicySet.inbound_of`: a pod of the registry (a workload, or a service
    endpoint with its labels) by address; its inbound side as a sidecar gets
    it (default inbound route, its AuthorizationPolicies' RBAC)."""
    mesh = Mesh(objs, reg)
    apply_mesh_config(mesh)

    def inbound(ip: str) -> dict[str, list[dict[str, Any]]] | None:
        wl = _pod_at(reg, ip)
        if wl is None:
            return None
        listener, clusters = inbound_side(mesh, wl)
        return {LISTENER: [listener], CLUSTER: clusters}

    return inbound


def _pod_at(reg: Registry, ip: str) -> Workload | None:
    known = next((w for w in reg.workloads if w.ip == ip), None)
    if known is not None:
        return known
    for svc in reg.services.values():
        for e in svc.endpoints:
            if e.ip == ip:
                return Workload(e.pod or f"pod-{ip}", svc.namespace, ip, dict(e.labels),
                                e.service_account)
    return None


def _registry(objs: ObjectSet) -> tuple[Registry, Workload, list[Workload]]:
    """The file's registry with the services, subsets and pods it names but does
    not define; the client workload; one pod per AuthorizationPolicy selector."""
    reg = from_k8s(objs)
    from .registry import add_service_entries
    add_service_entries(objs, reg)
    ips = (f"198.18.255.{i}" for i in itertools.count(1))
    _synthesize_subsets(objs, reg)
    _synthesize_services(objs, reg, ips)
    client = Workload("l7fp-client", "default", "198.18.254.1", {})
    reg.workloads.append(client)
    return reg, client, _synthesize_policy_pods(objs, reg, ips)


def _merged(mesh: Mesh, client: Workload, nodes: list[Workload]) -> dict[str, list[dict[str, Any]]]:
    """The resources of `nodes` as one set (each name once; the other pods'
    virtualInbound under names of their own)."""
    merged: dict[str, list[dict[str, Any]]] = {LISTENER: [], ROUTE: [], CLUSTER: [], ENDPOINT: []}
    seen: set[tuple[str, str]] = set()
    for wl in nodes:
        for type_url, items in generate(mesh, wl.node_id).items():
            for item in items:
                if type_url == LISTENER and item["name"] == "virtualInbound" and wl is not client:
                    item = dict(item, name=f"virtualInbound~{wl.name}")
                key = (type_url, str(item.get("name") or item.get("clusterName")))
                if key in seen:
                    continue
                seen.add(key)
                merged[type_url].append(item)
    return merged


def _hosts_and_ports(objs: ObjectSet) -> Iterator[tuple[str, str, int | None, dict[str, str]]]:
    """(host, namespace, port, subset labels) for every host the policies name."""
    for o in objs.of("VirtualService"):
        for h in o.spec.get("hosts") or []:
            yield str(h), o.namespace, None, {}
        for rule in o.spec.get("http") or []:
            for r in rule.get("route") or []:
                d = r.get("destination") or {}
                yield str(d.get("host", "")), o.namespace, (d.get("port") or {}).get("number"), {}
            for m in _mirror_dests(rule):
                yield (str(m.get("host", "")), o.namespace, (m.get("port") or {}).get("number"),
                       {})
    for o in objs.of("DestinationRule"):
        for s in o.spec.get("subsets") or []:
            yield str(o.spec.get("host", "")), o.namespace, None, dict(s.get("labels") or {})
        yield str(o.spec.get("host", "")), o.namespace, None, {}
    for kind in ("HTTPRoute", "GRPCRoute"):
        for o in objs.of(kind):
            for ref in o.spec.get("parentRefs") or []:
                if ref.get("kind") == "Service":
                    yield str(ref.get("name")), str(ref.get("namespace") or o.namespace), ref.get("port"), {}
            for h in o.spec.get("hostnames") or []:
                yield str(h), o.namespace, None, {}
            for rule in o.spec.get("rules") or []:
                for b in [*(rule.get("backendRefs") or []), *_gateway_mirror_refs(rule)]:
                    yield (str(b.get("name")), str(b.get("namespace") or o.namespace),
                           b.get("port"), {})


def _mirror_dests(rule: dict[str, Any]) -> list[dict[str, Any]]:
    """The destinations an Istio http rule mirrors to (`mirror`, `mirrors[]`)."""
    out = [rule["mirror"]] if rule.get("mirror") else []
    return out + [m.get("destination") or {} for m in rule.get("mirrors") or []]


def _gateway_mirror_refs(rule: dict[str, Any]) -> list[dict[str, Any]]:
    """backendRefs of a Gateway API rule's RequestMirror filters (the rule's and
    its backendRefs'): their services get clusters like any backend's."""
    filters = [*(rule.get("filters") or [])]
    for b in rule.get("backendRefs") or []:
        filters += b.get("filters") or []
    return [(f.get("requestMirror") or {}).get("backendRef") or {} for f in filters
            if f.get("type") == "RequestMirror"]


def _synthesize_services(objs: ObjectSet, reg: Registry, ips: Iterator[str]) -> None:
    for host, ns, port, labels in _hosts_and_ports(objs):
        if not host or "*" in host:
            continue
        svc = reg.resolve(host, ns)
        if svc is None:
            parts = host.split(".")
            name, sns = parts[0], (parts[1] if len(parts) > 1 and len(parts) < 5 else ns)
            hostname = host if len(parts) > 2 and not host.endswith(".svc") else ""
            svc = Service(name, sns, [], hostname=hostname if len(parts) > 2 else "")
            reg.add(svc)
        number = int(port) if port else None
        if number is not None and svc.port(number) is None:
            svc.ports.append(Port(number, f"http-{number}", "http", number))
        if labels and not any(all(e.labels.get(k) == v for k, v in labels.items())
                              for e in svc.endpoints):
            # a pod of the service: its app label too (AuthorizationPolicy selectors)
            svc.endpoints.append(Endpoint(next(ips), {"app": svc.name, **labels}))
    for svc in reg.services.values():
        if not svc.ports:
            svc.ports.append(Port(80, "http", "http", 80))
        if not svc.endpoints:
            svc.endpoints.append(Endpoint(next(ips), {"app": svc.name}))


def _synthesize_subsets(objs: ObjectSet, reg: Registry) -> None:
    """Subsets a VirtualService names that no DestinationRule of the file defines.

    The DestinationRule usually sits in another file of the same repository;
    a stand-in (labels `version: SUBSET`) keeps the route's cluster defined.
    """
    have = {(reg.fqdn(str(o.spec.get("host", "")), o.namespace), str(s.get("name")))
            for o in objs.of("DestinationRule") for s in o.spec.get("subsets") or []}
    missing: dict[tuple[str, str], set[str]] = {}
    for o in objs.of("VirtualService"):
        for rule in o.spec.get("http") or []:
            for d in [r.get("destination") or {} for r in rule.get("route") or []] + \
                    _mirror_dests(rule):
                host, subset = str(d.get("host", "")), d.get("subset")
                if subset and (reg.fqdn(host, o.namespace), str(subset)) not in have:
                    missing.setdefault((host, o.namespace), set()).add(str(subset))
    for (host, ns), subsets in missing.items():
        spec = {"host": host, "subsets": [{"name": s, "labels": {"version": s}} for s in sorted(subsets)]}
        objs.add(Obj("DestinationRule", f"l7fp-standin-{host}", ns, spec,
                     {"metadata": {"name": f"l7fp-standin-{host}"}}, "(synthesized)"))


def _synthesize_policy_pods(objs: ObjectSet, reg: Registry, ips: Iterator[str]) -> list[Workload]:
    """One pod per AuthorizationPolicy selector, behind a service so it has an inbound."""
    pods: list[Workload] = []
    for o in objs.of("AuthorizationPolicy"):
        labels = dict((o.spec.get("selector") or {}).get("matchLabels") or {})
        if any(p.namespace == o.namespace and p.labels == labels for p in pods):
            continue
        wl = Workload(f"{o.name}-pod", o.namespace, next(ips), labels)
        reg.workloads.append(wl)
        ports = sorted({int(p) for r in o.spec.get("rules") or [] for t in r.get("to") or []
                        for p in (t.get("operation") or {}).get("ports") or []}) or [8080]
        svc = Service(f"{o.name}-svc", o.namespace, [Port(p, "http", "http", p) for p in ports])
        svc.endpoints.append(Endpoint(wl.ip, labels))
        reg.add(svc)
        pods.append(wl)
    return pods


def split_reader(path: Path) -> list[Any]:
    """fastpath.inputs READERS entry: one Document (format `istio` or `gateway-api`).

    Import warnings (unsupported fields) become the Document's `skipped` lines.
    """
    from fastpath.inputs import Document

    if not can_read(path):
        return []
    try:
        objs = load_path(path, helm=True)
    except ValueError as exc:
        return [Document(str(path), "istio", error=str(exc))]
    kinds = {k for k, v in objs.by_kind.items() if v and k in POLICY_KINDS}
    if not kinds:
        return []
    fmt = "gateway-api" if kinds <= set(gateway_api.ROUTE_KINDS) else "istio"
    try:
        sets = [(ps, to_messages(ps.resources)) for ps in read_placed(objs)]
    except (ValueError, KeyError, TypeError) as exc:
        return [Document(str(path), fmt, error=f"import failed: {exc}")]
    skipped = list(objs.warnings)
    return [Document(str(path), fmt, resources, skipped=skipped if ps.placement == "mesh" else [],
                     placement=ps.placement, inbound_of=ps.inbound_of)
            for ps, resources in sets]


__all__ = ["KNOWN_KINDS", "PolicySet", "can_read", "read_file", "read_objects", "read_placed",
           "split_reader"]
