"""Per-sidecar Envoy resources, generated the way istiod generates them.

`generate(mesh, node_id)` is called by `xds_server.istio.source` (serve) and
`xds_server.istio.reader` (split coverage) and returns Envoy JSON dicts by
type URL; `to_messages` turns them into betterproto2 messages.

Shape (Istio's): `virtualOutbound` on 15001 (use_original_dst) hands each
connection to a bind_to_port=false listener `0.0.0.0_PORT` whose RDS route
table `PORT` has one virtual host per service with that port (plus
`allow_any`); `virtualInbound` on 15006 has one filter chain per service
target port of the pod, with the pod's RBAC, routing to `inbound|PORT||`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from xds_server.node import parse_istio_id

from . import authz, clusters, gateway_api, routes
from .objects import MESH_CONFIG_FIELDS, Obj, ObjectSet, exported_to, mesh_config
from .registry import DOMAIN, Registry, Service, Workload

T = "type.googleapis.com/envoy.config."
LISTENER, ROUTE, CLUSTER, ENDPOINT = (T + "listener.v3.Listener", T + "route.v3.RouteConfiguration",
                                      T + "cluster.v3.Cluster", T + "endpoint.v3.ClusterLoadAssignment")
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
OUTBOUND_PORT, INBOUND_PORT = 15001, 15006


@dataclass
class Mesh:
    """Everything one generation reads: policies, registry, options."""

    objs: ObjectSet
    reg: Registry
    inbound_address: str = "127.0.0.1"
    extra_routes: list[Obj] = field(default_factory=list)  # Gateway API routes as VirtualServices
    gateway_routes: bool = False  # also apply gateway-bound routes (split coverage only)
    policy_only: bool = False  # split coverage: only routes that come from a policy object
    # split coverage: only the routes Istio applies at that placement ("mesh": the
    # sidecars, "gateway": gateways only; routes.placement_of); "" all of them
    placement: str = ""
    default_retries: Mapping[str, Any] | None = None  # MeshConfig.defaultHttpRetryPolicy
    path_normalization: str = "BASE"  # MeshConfig.pathNormalization.normalization
    outbound_port: int = OUTBOUND_PORT  # where istio-iptables redirects outbound traffic
    inbound_port: int = INBOUND_PORT


def workload_of(mesh: Mesh, node_id: str) -> Workload:
    wl = mesh.reg.workload_for_node(node_id)
    if wl is not None:
        return wl
    parts = node_id.split("~")
    ip = parts[1] if len(parts) == 4 else ""
    ns = parts[2].rsplit(".", 1)[-1] if len(parts) == 4 and "." in parts[2] else "default"
    name = parts[2].rsplit(".", 1)[0] if len(parts) == 4 else node_id
    return Workload(name, ns, ip, {})


def generate(mesh: Mesh, node_id: str, labels: Mapping[str, str] | None = None
             ) -> dict[str, list[dict[str, Any]]]:
    """All resources for the proxy `node_id` (Envoy JSON dicts by type URL).

    A router node (`router~...`, an Istio gateway) gets what the Gateways that
    select it serve (xds_server.istio.gateway), never a sidecar's config;
    `labels` are its own (node metadata LABELS), over the registry's. A
    sidecar's labels are the registry's (which learns them as sidecars
    connect: source.IstioSource._learn).
    """
    wl = workload_of(mesh, node_id)
    if parse_istio_id(node_id).get("type") == "router":
        from .gateway import generate_router  # it builds on this module's parts

        return generate_router(mesh, replace(wl, labels={**wl.labels, **(labels or {})}))
    services = visible_services(mesh, wl)
    out: dict[str, list[dict[str, Any]]] = {LISTENER: [], ROUTE: [], CLUSTER: [], ENDPOINT: []}
    hash_policies: dict[str, list[dict[str, Any]]] = {}
    for svc in services:
        cs, cla = clusters.service_clusters(mesh.objs, mesh.reg, svc, wl.namespace, hash_policies)
        out[CLUSTER] += cs
        out[ENDPOINT] += cla
    out[CLUSTER] += _builtin_clusters()
    registry_only = _registry_only(mesh, wl)
    http_ports = sorted({p.number for s in services for p in s.ports if p.is_http})
    for port in http_ports:
        rc = _route_config(mesh, wl, services, port, hash_policies, registry_only)
        out[ROUTE].append(rc)
        out[LISTENER].append(_outbound_port_listener(port, mesh.path_normalization))
    out[LISTENER] += _tcp_listeners(services)
    out[LISTENER].insert(0, _virtual_outbound(registry_only, mesh.outbound_port))
    inbound, inbound_clusters = _inbound(mesh, wl)
    out[LISTENER].append(inbound)
    out[CLUSTER] += inbound_clusters
    return out


def visible_services(mesh: Mesh, wl: Workload) -> list[Service]:
    """Services the workload sees: all, or those its Sidecar's egress hosts allow."""
    sc = _sidecar_for(mesh, wl)
    svcs = list(mesh.reg.services.values())
    if sc is None:
        return svcs
    w = mesh.objs.warnings
    hosts: list[str] = []
    for i, eg in enumerate(sc.spec.get("egress") or []):
        for key in eg:
            if key not in ("hosts", "port", "bind", "captureMode"):
                w.add(sc, f"spec.egress[{i}].{key}", "unsupported field, ignored")
        for key in ("port", "bind", "captureMode"):
            if key in eg:
                w.add(sc, f"spec.egress[{i}].{key}", "unsupported; egress applies to all ports")
        hosts += [str(h) for h in eg.get("hosts") or []]
    for key in sc.spec:
        if key not in ("egress", "workloadSelector", "outboundTrafficPolicy"):
            w.add(sc, f"spec.{key}", "unsupported field, ignored")
    if not hosts:
        return svcs
    return [s for s in svcs if any(_egress_match(h, s, sc.namespace) for h in hosts)]


def _egress_match(entry: str, svc: Service, sc_ns: str) -> bool:
    ns, _, host = entry.partition("/")
    ns = sc_ns if ns == "." else ns
    if ns not in ("*", svc.namespace) and not (ns == "~"):
        return False
    return host == "*" or fnmatch.fnmatchcase(svc.hostname, host)


def _sidecar_for(mesh: Mesh, wl: Workload) -> Obj | None:
    default = None
    for o in mesh.objs.of("Sidecar"):
        if o.namespace != wl.namespace:
            continue
        sel = (o.spec.get("workloadSelector") or {}).get("labels")
        if sel is None:
            default = default or o
        elif all(wl.labels.get(k) == v for k, v in sel.items()):
            return o
    return default


def _registry_only(mesh: Mesh, wl: Workload) -> bool:
    sc = _sidecar_for(mesh, wl)
    mode = ((sc.spec.get("outboundTrafficPolicy") or {}).get("mode") if sc else None) or "ALLOW_ANY"
    return str(mode).upper() == "REGISTRY_ONLY"


def _virtual_services(mesh: Mesh) -> list[Obj]:
    return [o for o in mesh.objs.of("VirtualService") if _for_mesh(mesh, o)] + mesh.extra_routes


def _for_mesh(mesh: Mesh, o: Obj) -> bool:
    if mesh.placement:
        return mesh.placement in routes.placements(o)
    gws = o.spec.get("gateways")
    # bound to gateways only: xds_server.istio.gateway serves it to them
    return not gws or "mesh" in gws or mesh.gateway_routes


def _vs_for(mesh: Mesh, svc: Service, client_ns: str) -> Obj | None:
    """The VirtualService routing `svc` (Istio: the first one wins for sidecars)."""
    found = None
    for vs in _virtual_services(mesh):
        if not exported_to(vs, client_ns):
            continue
        for h in vs.spec.get("hosts") or []:
            fq = mesh.reg.fqdn(str(h), vs.namespace)
            if fq == svc.hostname or ("*" in fq and fnmatch.fnmatchcase(svc.hostname, fq)):
                if found is None:
                    found = vs
                elif found is not vs:
                    mesh.objs.warnings.add(vs, "spec.hosts", f"{svc.hostname} is already routed by "
                                           f"{found.ref}; this one is ignored for it (as istiod does)")
    return found


def _route_config(mesh: Mesh, wl: Workload, services: list[Service], port: int,
                  hash_policies: Mapping[str, list[dict[str, Any]]], registry_only: bool
                  ) -> dict[str, Any]:
    vhosts = []
    seen: set[str] = set()
    for svc in services:
        if svc.port(port) is None or not svc.port(port).is_http:  # type: ignore[union-attr]
            continue
        doms = [d for d in _domains(svc, port, wl.namespace) if d not in seen]
        seen.update(doms)
        vs = _vs_for(mesh, svc, wl.namespace)
        if vs is None and mesh.policy_only:
            continue
        rts = (vs_routes(mesh, vs, wl, port) if vs is not None
               else [_default_route(mesh, svc, port)])
        for r in rts:
            add_hash(r, hash_policies)
        vhosts.append({"name": f"{svc.hostname}:{port}", "domains": doms, "routes": rts,
                       "includeRequestAttemptCount": True})
    fallback = "BlackHoleCluster" if registry_only else "PassthroughCluster"
    if mesh.policy_only:
        return {"name": str(port), "virtualHosts": vhosts, "validateClusters": False}
    vhosts.append({"name": "block_all" if registry_only else "allow_any", "domains": ["*"],
                   "routes": [{"name": fallback, "match": {"prefix": "/"},
                               "route": {"cluster": fallback, "timeout": "0s"}}]})
    return {"name": str(port), "virtualHosts": vhosts, "validateClusters": False}


def vs_routes(mesh: Mesh, vs: Obj, wl: Workload, port: int, gateway: str = ""
              ) -> list[dict[str, Any]]:
    """The Envoy routes of VirtualService `vs` for proxy `wl` on `port`; with
    `gateway` (`NS/NAME`), those of that Istio Gateway's route table
    (xds_server.istio.gateway), else a sidecar's."""
    def namer(host: str, subset: str, dport: int | None) -> str:
        svc = mesh.reg.resolve(host, vs.namespace)
        fq = svc.hostname if svc else mesh.reg.fqdn(host, vs.namespace)
        if dport is None:
            dport = svc.ports[0].number if svc and len(svc.ports) == 1 else port
        return clusters.cluster_name(dport, subset, fq)

    out = []
    for i, rule in enumerate(vs.spec.get("http") or []):
        out += [routes.lift_header_ops(r) for r in
                routes.convert_http(mesh.objs.warnings, vs, i, rule, namer, port, wl.labels,
                                    wl.namespace, mesh.gateway_routes or bool(gateway),
                                    mesh.default_retries, mesh.placement, gateway)]
    for key in ("tcp", "tls"):
        if vs.spec.get(key):
            mesh.objs.warnings.add(vs, f"spec.{key}", "L4 routing is unsupported; ignored")
    for key in vs.spec:
        if key not in ("hosts", "gateways", "http", "tcp", "tls", "exportTo"):
            mesh.objs.warnings.add(vs, f"spec.{key}", "unsupported field, ignored")
    return out


def _default_route(mesh: Mesh, svc: Service, port: int) -> dict[str, Any]:
    # istiod's BuildDefaultHTTPOutboundRoute: setTimeout with no VirtualService
    ra: dict[str, Any] = {"cluster": clusters.cluster_name(port, "", svc.hostname), "timeout": "0s",
                          "maxGrpcTimeout": "0s"}
    retry = routes.default_route_retry(mesh.objs.warnings, mesh.default_retries)
    if retry is not None:
        ra["retryPolicy"] = retry
    return {"name": "default", "match": {"prefix": "/"}, "route": ra}


def add_hash(route: dict[str, Any], hash_policies: Mapping[str, list[dict[str, Any]]]) -> None:
    ra = route.get("route") or {}
    if ra.get("cluster") in hash_policies:
        ra["hashPolicy"] = hash_policies[ra["cluster"]]


def _domains(svc: Service, port: int, client_ns: str) -> list[str]:
    names = [svc.hostname]
    if svc.hostname.endswith("." + DOMAIN):
        short = svc.hostname[: -len(DOMAIN) - 1]  # name.ns
        names += [f"{short}.svc", short]
        if svc.namespace == client_ns:
            names.append(svc.name)
    if svc.vip:
        names.append(svc.vip)
    return [d for n in names for d in (n, f"{n}:{port}")]


def _http_filters(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return extra + [
        {"name": routes.FAULT, "typedConfig": {"@type": routes.TYPE_FAULT}},
        {"name": routes.CORS, "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.router", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]


# MeshConfig.pathNormalization.normalization -> HCM fields (istiod's mapping; default BASE).
PATH_NORMALIZATION: dict[str, dict[str, Any]] = {
    "NONE": {"normalizePath": False},
    "BASE": {"normalizePath": True},
    "MERGE_SLASHES": {"normalizePath": True, "mergeSlashes": True},
    "DECODE_AND_MERGE_SLASHES": {"normalizePath": True, "mergeSlashes": True,
                                 "pathWithEscapedSlashesAction": "UNESCAPE_AND_FORWARD"},
}


def hcm(stat: str, route: dict[str, Any], extra: list[dict[str, Any]] | None = None,
        normalization: str = "BASE", use_remote_address: bool = False) -> dict[str, Any]:
    """The HttpConnectionManager filter istiod writes (`use_remote_address`:
    true on a gateway, whose clients are outside the mesh)."""
    return {"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM_TYPE, "statPrefix": stat, **route, "httpFilters": _http_filters(extra or []),
        "useRemoteAddress": use_remote_address, "pathWithEscapedSlashesAction": "KEEP_UNCHANGED",
        **PATH_NORMALIZATION[normalization]}}


def rds(name: str) -> dict[str, Any]:
    """An HCM's `rds` over ADS for the route configuration `name`."""
    return {"rds": {"routeConfigName": name,
                    "configSource": {"ads": {}, "resourceApiVersion": "V3"}}}


def _outbound_port_listener(port: int, normalization: str) -> dict[str, Any]:
    return {"name": f"0.0.0.0_{port}", "address": addr("0.0.0.0", port), "bindToPort": False,
            "trafficDirection": "OUTBOUND",
            "filterChains": [{"filters": [hcm(f"outbound_0.0.0.0_{port}", rds(str(port)),
                                               normalization=normalization)]}]}


def _tcp_listeners(services: list[Service]) -> list[dict[str, Any]]:
    out = []
    for svc in services:
        for p in svc.ports:
            if p.is_http or not svc.vip:
                continue
            out.append({"name": f"{svc.vip}_{p.number}", "address": addr(svc.vip, p.number),
                        "bindToPort": False, "trafficDirection": "OUTBOUND",
                        "filterChains": [{"filters": [_tcp_proxy(
                            clusters.cluster_name(p.number, "", svc.hostname))]}]})
    return out


def _tcp_proxy(cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "statPrefix": cluster, "cluster": cluster}}


def _virtual_outbound(registry_only: bool, port: int) -> dict[str, Any]:
    fallback = "BlackHoleCluster" if registry_only else "PassthroughCluster"
    return {"name": "virtualOutbound", "address": addr("0.0.0.0", port),
            "useOriginalDst": True, "trafficDirection": "OUTBOUND",
            "filterChains": [{"name": "virtualOutbound-catchall-tcp", "filters": [_tcp_proxy(fallback)]}]}


def inbound_side(mesh: Mesh, wl: Workload) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pod `wl`'s `virtualInbound` listener and inbound clusters, as `generate`
    gives them: for `l7fp split` (xds_server.istio.reader), which needs the
    destinations' inbound side without their whole outbound config."""
    return _inbound(mesh, wl)


def _inbound(mesh: Mesh, wl: Workload) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rbac = authz.rbac_filters(mesh.objs, wl, mesh.reg)
    _peer_authn(mesh, wl)
    chains, cls = [], []
    targets = sorted({(p.target or p.number) for s in mesh.reg.services.values()
                      if any(e.ip == wl.ip for e in s.endpoints) for p in s.ports if p.is_http})
    for t in targets:
        name = f"inbound|{t}||"
        default = [] if mesh.policy_only else [{
            "name": "default", "match": {"prefix": "/"},
            "route": {"cluster": name, "timeout": "0s", "maxStreamDuration": {
                "maxStreamDuration": "0s", "grpcTimeoutHeaderMax": "0s"}}}]
        rc = {"routeConfig": {"name": name, "validateClusters": False, "virtualHosts": [{
            "name": f"inbound|http|{t}", "domains": ["*"], "routes": default}]}}
        chains.append({"name": f"0.0.0.0_{t}", "filterChainMatch": {"destinationPort": t},
                       "filters": [hcm(f"inbound_0.0.0.0_{t}", rc, rbac, mesh.path_normalization)]})
        cls.append({"name": name, "type": "STATIC", "connectTimeout": "10s",
                    "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [{
                        "endpoint": {"address": addr(mesh.inbound_address, t)}}]}]}})
    listener = {"name": "virtualInbound", "address": addr("0.0.0.0", mesh.inbound_port),
                "trafficDirection": "INBOUND", "listenerFilters": [{
                    "name": "envoy.filters.listener.original_dst", "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.listener."
                                 "original_dst.v3.OriginalDst"}}],
                "filterChains": chains,
                "defaultFilterChain": {"name": "inbound-passthrough",
                                       "filters": [_tcp_proxy("InboundPassthroughCluster")]}}
    return listener, cls


def _peer_authn(mesh: Mesh, wl: Workload) -> None:
    w = mesh.objs.warnings
    for o in mesh.objs.of("PeerAuthentication"):
        sel = (o.spec.get("selector") or {}).get("matchLabels") or {}
        if o.namespace not in (wl.namespace, authz.ROOT_NAMESPACE):
            continue
        if not all(wl.labels.get(k) == v for k, v in sel.items()):
            continue
        for key in o.spec:
            if key not in ("selector", "mtls", "portLevelMtls"):
                w.add(o, f"spec.{key}", "unsupported field, ignored")
        modes = [str((o.spec.get("mtls") or {}).get("mode") or "PERMISSIVE")]
        modes += [str((v or {}).get("mode")) for v in (o.spec.get("portLevelMtls") or {}).values()]
        if "STRICT" in (m.upper() for m in modes):
            w.add(o, "spec.mtls.mode", "STRICT mTLS is not implemented (no certificates in L7FP's "
                  "mesh); inbound stays plaintext")


def _builtin_clusters() -> list[dict[str, Any]]:
    orig = {"type": "ORIGINAL_DST", "lbPolicy": "CLUSTER_PROVIDED", "connectTimeout": "10s"}
    return [{"name": "PassthroughCluster", **orig},
            {"name": "InboundPassthroughCluster", **orig},
            {"name": "BlackHoleCluster", "type": "STATIC", "connectTimeout": "10s"}]


def addr(ip: str, port: int) -> dict[str, Any]:
    return {"socketAddress": {"address": ip, "portValue": port}}


def mesh_from(objs: ObjectSet, reg: Registry, inbound_address: str = "127.0.0.1") -> Mesh:
    """Bundle objects and registry; Gateway API mesh routes become VirtualServices."""
    mesh = Mesh(objs, reg, inbound_address, gateway_api.as_virtual_services(objs, reg, mesh_only=True))
    apply_mesh_config(mesh)
    return mesh


def apply_mesh_config(mesh: Mesh) -> None:
    cfg = mesh_config(mesh.objs)
    for key in cfg:
        if key not in MESH_CONFIG_FIELDS:
            found = mesh.objs.of("MeshConfig")[-1]
            mesh.objs.warnings.add(found, f"data.mesh.{key}", "MeshConfig field not read by the importer")
    if "defaultHttpRetryPolicy" in cfg:
        mesh.default_retries = cfg["defaultHttpRetryPolicy"] or {}
    norm = str((cfg.get("pathNormalization") or {}).get("normalization") or "BASE").upper()
    if norm == "DEFAULT":
        norm = "BASE"
    if norm not in PATH_NORMALIZATION:
        mesh.objs.warnings.add(mesh.objs.of("MeshConfig")[-1], "data.mesh.pathNormalization",
                               f"{norm!r} unknown; BASE used")
        norm = "BASE"
    mesh.path_normalization = norm
