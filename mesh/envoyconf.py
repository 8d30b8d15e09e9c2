"""Envoy resources of each pod, generated from the mesh file and its policy.

Called by `mesh.runner` (at `up` and on every policy change) and
`mesh.configdir` (which writes them). Pure: returns dicts in Envoy's JSON form
with `@type`. Istio's shapes and names: listener `virtualOutbound` on 15001 and
`virtualInbound` on 15006 (original-destination filter chains per service
VIP/port and per own port), clusters `outbound|PORT||FQDN` and `inbound|PORT||`,
route configurations named like their clusters. Routes go through RDS so a
policy change takes effect on open connections without a listener drain.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from mesh import naming
from mesh.netrules import ServiceAddr
from mesh.spec import ENVOY_ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, MeshSpec, zipkin_collector
from xds_server.bootstrap import XDS_CLUSTER

T = "type.googleapis.com/"
LISTENER = T + "envoy.config.listener.v3.Listener"
ROUTE = T + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = T + "envoy.config.cluster.v3.Cluster"
CLA = T + "envoy.config.endpoint.v3.ClusterLoadAssignment"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}
ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst",
                "typed_config": {"@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}


@dataclass(frozen=True)
class PodInfo:
    """What config generation needs to know about one pod."""

    name: str
    service: str
    ip: str
    node_id: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Delivery:
    """How Envoy gets RDS/EDS: over ADS, or from files in `file_dir` (Envoy's own watch)."""

    mode: str = "ads"  # "ads" | "file"
    file_dir: str = ""

    def source(self, filename: str) -> dict[str, Any]:
        if self.mode == "ads":
            return {"ads": {}, "resource_api_version": "V3"}
        return {"path_config_source": {"path": f"{self.file_dir}/{filename}",
                                       "watched_directory": {"path": self.file_dir}},
                "resource_api_version": "V3"}


def rds_filename(route_name: str) -> str:
    return "rds-" + "".join(c if c.isalnum() or c in "-." else "_" for c in route_name) + ".yaml"


def _port_of(spec: MeshSpec, service: str, port: int) -> int:
    ports = spec.ports_of(service)
    return port if port in ports else ports[0]


def _expand_routes(routes: list[dict[str, Any]], resolve: Any, default: str) -> list[dict[str, Any]]:
    """Copy routes, turning short cluster names into full ones; default the target.

    A route without `timeout` gets Istio's default `0s` (no route timeout)
    instead of Envoy's 15 s, which the kernel fast path could not enforce.
    """
    out = []
    for r in copy.deepcopy(routes or [{"match": {"prefix": "/"}}]):
        action = r.get("route")
        if isinstance(action, dict):
            if isinstance(action.get("cluster"), str):
                action["cluster"] = resolve(action["cluster"])
            elif "weighted_clusters" in action:
                for c in action["weighted_clusters"].get("clusters", []):
                    c["name"] = resolve(c["name"])
            elif "cluster_header" not in action:
                action["cluster"] = default
            for m in action.get("request_mirror_policies", []):
                if isinstance(m.get("cluster"), str):
                    m["cluster"] = resolve(m["cluster"])
        elif not any(k in r for k in ("direct_response", "redirect")):
            r["route"] = {"cluster": default}
        if isinstance(r.get("route"), dict):
            r["route"].setdefault("timeout", "0s")
        out.append(r)
    return out


def _hcm(stat_prefix: str, route_name: str, filters: list[dict[str, Any]], delivery: Delivery,
         tracing: dict[str, Any] | None) -> dict[str, Any]:
    hcm = {"@type": HCM, "stat_prefix": stat_prefix,
           "rds": {"route_config_name": route_name,
                   "config_source": delivery.source(rds_filename(route_name))},
           "http_filters": [*copy.deepcopy(filters), ROUTER]}
    if tracing is not None:
        hcm["tracing"] = tracing
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def _policy(spec: MeshSpec, service: str, side: str) -> dict[str, Any]:
    return spec.policies.get(service, {}).get(side, {"routes": [], "http_filters": [], "tracing": None})


def _tracing(spec: MeshSpec, pol: dict[str, Any]) -> dict[str, Any] | None:
    """A side's HCM `tracing`, its Zipkin collector's service name made the
    service's outbound cluster (first port), which every sidecar has, and the
    reports' Host the service's name (Envoy's default, the cluster name, has
    `|`: the collector's inbound sidecar refused every report as a protocol
    error, tracing.zipkin.reports_dropped)."""
    tracing = copy.deepcopy(pol["tracing"])
    collector = zipkin_collector(tracing)
    if collector is not None:
        port = spec.ports_of(collector)[0]
        cfg = tracing["provider"]["typed_config"]
        cfg["collector_cluster"] = naming.outbound_cluster(collector, port, spec.namespace)
        cfg.setdefault("collector_hostname", f"{naming.fqdn(collector, spec.namespace)}:{port}")
    return tracing  # type: ignore[no-any-return]


def outbound_resources(spec: MeshSpec, services: list[ServiceAddr],
                       delivery: Delivery) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Outbound listeners and one route configuration per service port.

    `virtualOutbound` (15001, `use_original_dst`) hands each intercepted
    connection to the listener `<VIP>_<port>` of its original destination
    (`bind_to_port: false`), as Istio does for its per-service listeners; that
    listener's HTTP connection manager carries the service's outbound filters
    and routes over RDS (`outbound|PORT||FQDN`). One virtual host per listener
    and no filter-chain match is the shape the kernel fast path takes (the
    agent tracks the listener's VIP:port). Other destinations: TCP passthrough.
    """
    ns = spec.namespace
    listeners, routes = [], []
    for svc in services:
        pol = _policy(spec, svc.name, "outbound")
        tracing = _tracing(spec, pol)
        for port in svc.ports:
            name = naming.outbound_cluster(svc.name, port, ns)

            def resolve(short: str, port: int = port) -> str:
                return naming.outbound_cluster(short, _port_of(spec, short, port), ns)

            routes.append({"@type": ROUTE, "name": name, "validate_clusters": False,
                           "virtual_hosts": [{"name": f"{naming.fqdn(svc.name, ns)}:{port}",
                                              "domains": ["*"],
                                              "routes": _expand_routes(pol["routes"], resolve, name)}]})
            listeners.append({
                "@type": LISTENER, "name": f"{svc.vip}_{port}", "traffic_direction": "OUTBOUND",
                "address": {"socket_address": {"address": svc.vip, "port_value": port}},
                "bind_to_port": False,
                "filter_chains": [{"filters": [_hcm(f"outbound_{svc.name}_{port}", name,
                                                    pol["http_filters"], delivery, tracing)]}]})
    virtual = {"@type": LISTENER, "name": "virtualOutbound", "traffic_direction": "OUTBOUND",
               "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
               "use_original_dst": True, "listener_filters": [ORIGINAL_DST],
               "filter_chains": [{"name": "PassthroughFilterChain", "filters": [{
                   "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                       "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                       "stat_prefix": "PassthroughCluster", "cluster": "PassthroughCluster"}}]}]}
    return [virtual, *listeners], routes


def inbound_resources(spec: MeshSpec, service: str,
                      delivery: Delivery) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `virtualInbound` listener and one route configuration per own port."""
    pol = _policy(spec, service, "inbound")
    tracing = _tracing(spec, pol)
    chains, routes = [], []
    for port in spec.ports_of(service):
        name = naming.inbound_cluster(port)
        routes.append({"@type": ROUTE, "name": name, "validate_clusters": False,
                       "virtual_hosts": [{"name": f"inbound|http|{port}", "domains": ["*"],
                                          "routes": _expand_routes(pol["routes"],
                                                                   lambda _s, n=name: n, name)}]})
        chains.append({"name": name, "filter_chain_match": {"destination_port": port},
                       "filters": [_hcm(f"inbound_{port}", name, pol["http_filters"], delivery,
                                       tracing)]})
    listener = {"@type": LISTENER, "name": "virtualInbound", "traffic_direction": "INBOUND",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
                "listener_filters": [ORIGINAL_DST], "filter_chains": chains}
    return listener, routes


def _endpoints(name: str, addrs: list[tuple[str, int]]) -> dict[str, Any]:
    return {"@type": CLA, "cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
        for a, p in addrs]}]}


def shared_cluster_resources(spec: MeshSpec, services: list[ServiceAddr],
                             delivery: Delivery) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(clusters, load assignments) every sidecar has: each service port, passthrough."""
    clusters: list[dict[str, Any]] = []
    clas: list[dict[str, Any]] = []
    for svc in services:
        for port in svc.ports:
            name = naming.outbound_cluster(svc.name, port, spec.namespace)
            cla = _endpoints(name, [(ip, port) for ip in svc.pod_ips])
            c: dict[str, Any] = {"@type": CLUSTER, "name": name, "connect_timeout": "1s",
                                 "lb_policy": "ROUND_ROBIN"}
            if delivery.mode == "ads":
                c |= {"type": "EDS", "eds_cluster_config": {"eds_config": delivery.source("")}}
                clas.append(cla)
            else:
                c |= {"type": "STATIC",
                      "load_assignment": {k: v for k, v in cla.items() if k != "@type"}}
            clusters.append(c)
    clusters.append({"@type": CLUSTER, "name": "PassthroughCluster", "type": "ORIGINAL_DST",
                     "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"})
    clusters.append({"@type": CLUSTER, "name": "BlackHoleCluster", "type": "STATIC",
                     "connect_timeout": "1s"})
    return clusters, clas


def inbound_clusters(spec: MeshSpec, service: str) -> list[dict[str, Any]]:
    """`inbound|PORT||` per own port: the app on 127.0.0.1 (not intercepted for uid 1337)."""
    out = []
    for port in spec.ports_of(service):
        name = naming.inbound_cluster(port)
        cla = _endpoints(name, [("127.0.0.1", port)])
        out.append({"@type": CLUSTER, "name": name, "type": "STATIC", "connect_timeout": "1s",
                    "load_assignment": {k: v for k, v in cla.items() if k != "@type"}})
    return out


def shared_resources(spec: MeshSpec, services: list[ServiceAddr],
                     delivery: Delivery) -> dict[str, list[dict[str, Any]]]:
    """What every sidecar of the mesh has alike: the outbound side."""
    out_l, out_r = outbound_resources(spec, services, delivery)
    clusters, clas = shared_cluster_resources(spec, services, delivery)
    return {CLUSTER: clusters, CLA: clas, LISTENER: out_l, ROUTE: out_r}


def service_resources(spec: MeshSpec, service: str,
                      delivery: Delivery) -> dict[str, list[dict[str, Any]]]:
    """What the sidecars of one service have on top: the inbound side."""
    in_l, in_r = inbound_resources(spec, service, delivery)
    return {CLUSTER: inbound_clusters(spec, service), CLA: [], LISTENER: [in_l], ROUTE: in_r}


def pod_resources(spec: MeshSpec, pod: PodInfo, services: list[ServiceAddr],
                  delivery: Delivery) -> dict[str, list[dict[str, Any]]]:
    """All resources of one pod's sidecar, by type URL."""
    shared = shared_resources(spec, services, delivery)
    own = service_resources(spec, pod.service, delivery)
    return {t: shared[t] + own[t] for t in (CLUSTER, CLA, LISTENER, ROUTE)}


def sidecar_bootstrap(pod: PodInfo, cluster: str, delivery: Delivery,
                      xds: tuple[str, int] | None) -> dict[str, Any]:
    """Bootstrap of a pod's sidecar: ADS to `xds`, or Envoy's file watch of `delivery`."""
    boot: dict[str, Any] = {
        "node": {"id": pod.node_id, "cluster": cluster,
                 "metadata": {"NAME": pod.name, "INSTANCE_IPS": pod.ip, "LABELS": dict(pod.labels) or {"app": pod.service}}},
        "admin": {"address": {"socket_address": {"address": "0.0.0.0", "port_value": ENVOY_ADMIN_PORT}}},
    }
    if delivery.mode == "ads":
        assert xds is not None
        boot["dynamic_resources"] = {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
            "lds_config": delivery.source(""), "cds_config": delivery.source("")}
        boot["static_resources"] = {"clusters": [{
            "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": xds[0], "port_value": xds[1]}}}}]}]}}]}
    else:
        boot["dynamic_resources"] = {"lds_config": delivery.source("lds.yaml"),
                                     "cds_config": delivery.source("cds.yaml")}
    return boot


def direct_response_bootstrap(service: str, ports: tuple[int, ...]) -> dict[str, Any]:
    """A leaf app that is itself an Envoy answering 200 from `direct_response`."""
    listeners = []
    for port in ports:
        route = {"match": {"prefix": "/"},
                 "direct_response": {"status": 200, "body": {"inline_string": f"{service} ok\n"}}}
        listeners.append({
            "name": f"leaf_{port}",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": {
                "@type": HCM, "stat_prefix": f"leaf_{port}", "http_filters": [ROUTER],
                "route_config": {"name": "leaf", "virtual_hosts": [{
                    "name": "leaf", "domains": ["*"], "routes": [route],
                    "response_headers_to_add": [{"header": {"key": "x-l7fp-service",
                                                            "value": service}}]}]}}}]}]})
    return {"static_resources": {"listeners": listeners}}
