"""Ingress gateways (router nodes): what istiod gives a `router~...` proxy.

`generate_router(mesh, wl)` is called by `xds_server.istio.sidecar.generate`
for a node id of type `router`; `check_gateways(mesh)` by `istio.load` (so
`l7fp istio check` and the serve status show what is not served).

Shape (istiod's gateway listeners): the Istio `Gateway` objects (networking.
istio.io, any version, any namespace) whose `spec.selector` matches the
proxy's labels give one listener `0.0.0.0_PORT` per distinct port of their
HTTP / HTTP2 / GRPC servers, bound to 0.0.0.0:PORT (PORT: the target port of
the gateway's own Service when the registry has one with that port, else
the server's port), an HCM with `use_remote_address: true` and RDS
`http.PORT`; that route table has one virtual host per host a VirtualService
bound to the Gateway shares with the server's `hosts`. The routes are the
sidecars' (`sidecar.vs_routes`), the clusters and endpoints those routes name
are the sidecars' outbound ones (`clusters.service_clusters`).

A Gateway API `Gateway` (`gatewayClassName: istio`) is served the same way to
the gateway istiod deploys for it (label `gateway.networking.k8s.io/gateway-name`,
same namespace): each HTTP listener is a server whose hosts are the
listener's `hostname` (routes of the Gateway's namespace, or of any with
`allowedRoutes.namespaces.from: All`), and the HTTPRoutes / GRPCRoutes
attached to it (`gateway_api.attached_routes`) are its VirtualServices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xds_server.protojson import route_cluster_refs

from . import clusters, gateway_api
from .objects import Obj, as_list, check_fields, exported_to
from .registry import Workload
from .routes import gateway_refs
from .sidecar import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Mesh,
    add_hash,
    addr,
    hcm,
    rds,
    visible_services,
    vs_routes,
)

log = logging.getLogger(__name__)

ISTIO_GROUP = "networking.istio.io"
# the label of the pods istiod deploys for a Gateway API Gateway (older Istio: the second)
API_GATEWAY_LABEL, OLD_API_GATEWAY_LABEL = ("gateway.networking.k8s.io/gateway-name",
                                            "istio.io/gateway-name")
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
SERVER_FIELDS = {"port", "hosts", "tls", "name", "bind", "defaultEndpoint"}


@dataclass(frozen=True)
class Server:
    """One HTTP server of a Gateway (Istio's) or HTTP listener of a Gateway
    API Gateway (`listener`: its name) that L7FP serves."""

    gateway: Obj
    port: int  # the Gateway's server port (virtual host names; VirtualService match.port)
    hosts: tuple[str, ...]  # as written: `host`, `ns/host`, `./host`, `*`
    https_redirect: bool  # tls.httpsRedirect: answer 301 to https
    listener: str | None = None  # Gateway API: routes attach to it, not VirtualServices

    @property
    def ref(self) -> str:
        return f"{self.gateway.namespace}/{self.gateway.name}"


def istio_gateways(mesh: Mesh) -> list[Obj]:
    """The Istio `Gateway` objects (not Gateway API's, which share the kind)."""
    return [o for o in mesh.objs.of("Gateway")
            if str(o.raw.get("apiVersion") or "").startswith(ISTIO_GROUP + "/")]


def api_gateways(mesh: Mesh) -> list[Obj]:
    """The Gateway API `Gateway` objects of `gatewayClassName: istio`; the
    others get a warning (another controller's: L7FP does not serve them)."""
    out = []
    for o in mesh.objs.of("Gateway"):
        if not str(o.raw.get("apiVersion") or "").startswith(gateway_api.GROUP + "/"):
            continue
        cls = str(o.spec.get("gatewayClassName") or "")
        if cls == "istio":
            out.append(o)
        else:
            mesh.objs.warnings.add(o, "spec.gatewayClassName", f"{cls!r} is not 'istio': "
                                   "another controller's Gateway; not served")
    return out


def api_servers(mesh: Mesh, gw: Obj) -> list[Server]:
    """The HTTP listeners of the Gateway API Gateway `gw`; each other one gets a
    warning naming the Gateway, the listener (port and name) and why."""
    w = mesh.objs.warnings
    check_fields(w, gw, "spec", gw.spec, {"gatewayClassName", "listeners", "addresses",
                                          "infrastructure"})
    out = []
    for i, raw in enumerate(as_list(w, gw, "spec.listeners", gw.spec.get("listeners"))):
        path = f"spec.listeners[{i}]"
        lis = check_fields(w, gw, path, raw, {"name", "port", "protocol", "hostname", "tls",
                                              "allowedRoutes"})
        which = f"{path} (port {lis.get('port')}, {lis.get('name') or 'no name'})"
        protocol = str(lis.get("protocol") or "").upper()
        if protocol == "HTTPS" or (protocol == "TLS" and
                                   str((lis.get("tls") or {}).get("mode", "Terminate")) == "Terminate"):
            w.add(gw, which, f"protocol {protocol} terminates TLS (certificateRefs): no Kubernetes "
                  "secret source (SDS) in L7FP; listener not served")
            continue
        if protocol != "HTTP":
            why = ("TLS passthrough: L4 (SNI) routing is not implemented" if protocol == "TLS"
                   else "only HTTP listeners are served")
            w.add(gw, which, f"protocol {protocol or '(none)'}: {why}; listener not served")
            continue
        if "port" not in lis or "name" not in lis:
            w.add(gw, which, "no port or no name; listener not served")
            continue
        allowed = str(((lis.get("allowedRoutes") or {}).get("namespaces") or {}).get("from") or "Same")
        if allowed not in ("Same", "All"):
            w.add(gw, f"{path}.allowedRoutes.namespaces.from", f"{allowed!r} unsupported; "
                  "routes of the Gateway's namespace only (Same)")
        ns = "*" if allowed == "All" else "."
        out.append(Server(gw, int(lis["port"]), (f"{ns}/{lis.get('hostname') or '*'}",), False,
                          str(lis["name"])))
    return out


def servers(mesh: Mesh, gw: Obj) -> list[Server]:
    """The servers of `gw` L7FP serves; each other one gets a warning naming
    the Gateway, the server (port and name) and why."""
    w = mesh.objs.warnings
    check_fields(w, gw, "spec", gw.spec, {"selector", "servers"})
    out = []
    for i, raw in enumerate(as_list(w, gw, "spec.servers", gw.spec.get("servers"))):
        path = f"spec.servers[{i}]"
        srv = check_fields(w, gw, path, raw, SERVER_FIELDS)
        port = check_fields(w, gw, f"{path}.port", srv.get("port"),
                            {"number", "name", "protocol", "targetPort"})
        which = f"{path} (port {port.get('number')}, {port.get('name') or 'no name'})"
        protocol = str(port.get("protocol") or "").upper()
        tls = check_fields(w, gw, f"{path}.tls", srv.get("tls"), {
            "httpsRedirect", "mode", "credentialName", "serverCertificate", "privateKey",
            "caCertificates", "subjectAltNames", "minProtocolVersion", "maxProtocolVersion",
            "cipherSuites", "credentialNames", "verifyCertificateSpki", "verifyCertificateHash"})
        why = _not_served(protocol, tls)
        if why:
            w.add(gw, which, f"{why}; server not served")
            continue
        for key in ("bind", "defaultEndpoint"):
            if key in srv:
                w.add(gw, f"{path}.{key}", "unsupported; the server listens on 0.0.0.0")
        hosts = tuple(str(h) for h in as_list(w, gw, f"{path}.hosts", srv.get("hosts")))
        if not hosts or "number" not in port:
            w.add(gw, which, "no hosts or no port number; server not served")
            continue
        out.append(Server(gw, int(port["number"]), hosts, bool(tls.get("httpsRedirect"))))
    return out


def _not_served(protocol: str, tls: Any) -> str:
    """Why L7FP cannot serve a server of this protocol and tls block, or ""."""
    mode = str(tls.get("mode") or "").upper()
    if protocol in ("HTTPS", "TLS") or mode not in ("", "DISABLE"):
        if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH") or protocol == "TLS" and not mode:
            return f"protocol {protocol} with TLS passthrough: L4 (SNI) routing is not implemented"
        what = f"credentialName {tls['credentialName']!r}" if tls.get("credentialName") else \
            "certificate files" if tls.get("serverCertificate") else "no certificate"
        return (f"protocol {protocol or 'HTTP'} terminates TLS ({mode or 'SIMPLE'}, {what}): "
                "no Kubernetes secret source (SDS) in L7FP")
    if protocol not in HTTP_PROTOCOLS:
        return f"protocol {protocol or '(none)'}: only HTTP, HTTP2 and GRPC servers are served"
    return ""


def check_gateways(mesh: Mesh) -> None:
    """Warn once per load about every Gateway server or listener L7FP does
    not serve, and every route bound to a gateway that is none of the policies'."""
    w = mesh.objs.warnings
    known = set()
    for gw in istio_gateways(mesh):
        servers(mesh, gw)
        known.add(f"{gw.namespace}/{gw.name}")
    for vs in mesh.objs.of("VirtualService"):
        for ref in sorted(gateway_refs(vs.spec.get("gateways"), vs.namespace) - {"mesh"} - known):
            w.add(vs, "spec.gateways", f"{ref!r} is no Istio Gateway of the policies; nothing "
                  "serves this VirtualService there")
    known = set()
    for gw in api_gateways(mesh):
        api_servers(mesh, gw)
        known.add(f"{gw.namespace}/{gw.name}")
    for kind in gateway_api.ROUTE_KINDS:
        for o in mesh.objs.of(kind):
            for i, ref in gateway_api.parent_gateways(o):
                if ref not in known:
                    w.add(o, f"spec.parentRefs[{i}]", f"Gateway {ref!r} is no Gateway "
                          "(gatewayClassName istio) of the policies; not served there")


def _servers_for(mesh: Mesh, wl: Workload) -> Iterator[Server]:
    """The servers of the Gateways that select the proxy `wl`: Istio Gateways
    by `spec.selector` (any namespace), Gateway API ones (in the proxy's
    namespace) by the label istiod puts on the gateway it deploys for them."""
    for gw in istio_gateways(mesh):
        sel = gw.spec.get("selector") or {}
        if all(wl.labels.get(str(k)) == str(v) for k, v in sel.items()):
            yield from servers(mesh, gw)
    name = wl.labels.get(API_GATEWAY_LABEL) or wl.labels.get(OLD_API_GATEWAY_LABEL)
    for gw in api_gateways(mesh):
        if gw.name == name and gw.namespace == wl.namespace:
            yield from api_servers(mesh, gw)


def listen_ports(mesh: Mesh, wl: Workload) -> dict[int, list[Server]]:
    """The ports the gateway proxy `wl` listens on, each with the servers it
    serves there; empty when no Gateway selects `wl`. Called by
    generate_router and by the local mesh (mesh.daemon checks a gateway's
    `ports:` against it before waiting on them)."""
    by_port: dict[int, list[Server]] = {}
    for srv in _servers_for(mesh, wl):
        by_port.setdefault(_listen_port(mesh, wl, srv.port), []).append(srv)
    return by_port


def generate_router(mesh: Mesh, wl: Workload) -> dict[str, list[dict[str, Any]]]:
    """The resources of the gateway proxy `wl` (its labels: the node's LABELS)."""
    out: dict[str, list[dict[str, Any]]] = {LISTENER: [], ROUTE: [], CLUSTER: [], ENDPOINT: []}
    by_port = listen_ports(mesh, wl)
    if not by_port:
        log.info("router %s.%s (labels %s): no Gateway selects it; no listeners",
                 wl.name, wl.namespace, dict(wl.labels))
        return out
    hash_policies: dict[str, list[dict[str, Any]]] = {}
    all_clusters, all_cla = [], []
    for svc in visible_services(mesh, wl):
        cs, cla = clusters.service_clusters(mesh.objs, mesh.reg, svc, wl.namespace, hash_policies)
        all_clusters += cs
        all_cla += cla
    for port, srvs in sorted(by_port.items()):
        rc = _route_config(mesh, wl, port, srvs)
        for vh in rc["virtualHosts"]:
            for r in vh["routes"]:
                add_hash(r, hash_policies)
        out[ROUTE].append(rc)
        out[LISTENER].append({
            "name": f"0.0.0.0_{port}", "address": addr("0.0.0.0", port),
            "trafficDirection": "OUTBOUND", "filterChains": [{"filters": [hcm(
                f"outbound_0.0.0.0_{port}", rds(f"http.{port}"),
                normalization=mesh.path_normalization, use_remote_address=True)]}]})
    named = {c for rc in out[ROUTE] for vh in rc["virtualHosts"] for r in vh["routes"]
             for _, c in route_cluster_refs(r)}
    out[CLUSTER] = [c for c in all_clusters if c["name"] in named]
    out[ENDPOINT] = [c for c in all_cla if c["clusterName"] in named]
    return out


def _listen_port(mesh: Mesh, wl: Workload, port: int) -> int:
    """istiod binds a server to the target port of the gateway's own Service
    (one whose endpoints include the gateway pod) for that port, if any."""
    for svc in mesh.reg.services.values():
        p = svc.port(port)
        if p is not None and p.target and any(e.ip == wl.ip for e in svc.endpoints if wl.ip):
            return p.target
    return port


def _route_config(mesh: Mesh, wl: Workload, port: int, srvs: list[Server]) -> dict[str, Any]:
    """Route table `http.PORT`: a virtual host per host a bound VirtualService
    shares with a server; routes of one host from several VirtualServices
    follow each other in file order."""
    vhosts: dict[str, dict[str, Any]] = {}
    done: set[tuple[str, str]] = set()
    for srv in srvs:
        for vs, host in _bound_hosts(mesh, wl, srv):
            if (vs.ref, host) in done:  # two servers of the port allow the same host
                continue
            done.add((vs.ref, host))
            vh = vhosts.get(host)
            if vh is None:
                vh = vhosts[host] = {"name": f"{host}:{srv.port}",
                                     "domains": [host] if host == "*" else [host, f"{host}:*"],
                                     "routes": [], "includeRequestAttemptCount": True}
                if srv.https_redirect:
                    vh["requireTls"] = "ALL"
            vh["routes"] += vs_routes(mesh, vs, wl, srv.port, gateway=srv.ref)
    hosts = [vh for vh in vhosts.values() if vh["routes"]]
    if not hosts:  # istiod: a route table with no host answers 404 to everything
        hosts = [{"name": f"blackhole:{port}", "domains": ["*"], "routes": [{
            "name": "default", "match": {"prefix": "/"}, "directResponse": {"status": 404}}]}]
    return {"name": f"http.{port}", "virtualHosts": hosts, "validateClusters": False}


def _bound_hosts(mesh: Mesh, wl: Workload, srv: Server) -> Iterator[tuple[Obj, str]]:
    """(VirtualService, host) for each VirtualService bound to the server's
    Gateway (for a Gateway API listener: each route attached to it) and
    visible from the gateway's namespace, and each of its hosts the server
    allows (the narrower of the two names when one is a wildcard)."""
    if srv.listener is not None:
        bound = gateway_api.attached_routes(mesh.objs, srv.gateway, srv.listener, srv.port)
    else:
        bound = [vs for vs in mesh.objs.of("VirtualService")
                 if srv.ref in gateway_refs(vs.spec.get("gateways"), vs.namespace)]
    for vs in bound:
        if not exported_to(vs, wl.namespace):
            continue
        for h in vs.spec.get("hosts") or []:
            host = allowed_host(mesh.reg.fqdn(str(h), vs.namespace), vs.namespace, srv)
            if host:
                yield vs, host


def allowed_host(host: str, vs_namespace: str, srv: Server) -> str:
    """The name under which the server serves the VirtualService host `host`
    (of a VirtualService in `vs_namespace`), or "" when its hosts do not allow
    it. A server host `NS/HOST` admits VirtualServices of NS only (`.`: the
    Gateway's namespace, `*`: any); a bare HOST is `*/HOST`."""
    for entry in srv.hosts:
        ns, _, name = entry.rpartition("/")
        ns = srv.gateway.namespace if ns == "." else ns or "*"
        if ns not in ("*", vs_namespace):
            continue
        if _within(host, name):
            return host
        if _within(name, host):
            return name
    return ""


def _within(host: str, pattern: str) -> bool:
    """Is every name `host` stands for also one `pattern` stands for? (`*` and
    `*.suffix` wildcards, as Istio's host matching)"""
    if pattern == "*" or host == pattern:
        return True
    return pattern.startswith("*.") and (host.endswith(pattern[1:]) and host != pattern[1:])
