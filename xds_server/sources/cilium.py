"""CiliumEnvoyConfig: its Envoy resources, and the endpoints cilium-agent feeds them.

Called by `fastpath.inputs_cilium` (`l7fp split`) and `xds_server.sources.files`
(`l7fp serve --config DIR`); sans-I/O: it takes parsed YAML documents and returns
proto-JSON dicts. Owns the Cilium conventions only; the service registry is the
Istio importer's (`xds_server.istio.registry.from_k8s`).

A CiliumEnvoyConfig (or CiliumClusterwideEnvoyConfig) lists Envoy resources in
`spec.resources` and names Kubernetes Services in `spec.services` (traffic
redirected to its listener) and `spec.backendServices` (backends only). For
every named Service cilium-agent publishes ClusterLoadAssignments over its own
EDS (pkg/ciliumenvoyconfig, `computeLoadAssignments`):

* no port selected (no `services[].ports`, no `backendServices[].number`):
  `NS/NAME:*` and `NS/NAME`, each with every ready backend address of every
  service port (ip:targetPort, one entry per distinct address);
* ports selected (the union over every CEC naming the Service): one
  `NS/NAME:P` per selected P, P a service port name or number, with the
  backends of that port (a nameless port matches by number);
* a Service that is not there, or has no ready backend: no assignment at all
  (the EDS cluster stays without endpoints).

A cluster is served from those assignments when its EDS service name
(`eds_cluster_config.service_name`, else its name) is one of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xds_server.istio.objects import ObjectSet, parse_documents
from xds_server.istio.registry import Registry, Service, from_k8s

CEC_KINDS = frozenset({"CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"})
REGISTRY_KINDS = frozenset({"Service", "EndpointSlice", "Pod"})
ANY_PORT = "*"  # cilium-agent's name for "every port" (pkg/ciliumenvoyconfig: anyPort)
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# cilium-agent takes its proxy ports from 10000-20000; L7FP from the part below
# the 15xxx ports of Istio (15000 admin, 15001/15006 capture, 15010 xDS)
PROXY_PORTS = (10000, 15000)


@dataclass(frozen=True)
class ServiceRef:
    """One entry of `spec.services` / `spec.backendServices`: a Service and its port filter."""

    namespace: str
    name: str
    ports: frozenset[str] = frozenset()  # service port names/numbers; empty: every port

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def is_cec(doc: Any) -> bool:
    return isinstance(doc, Mapping) and doc.get("kind") in CEC_KINDS


def is_registry_object(doc: Any) -> bool:
    return isinstance(doc, Mapping) and doc.get("kind") in REGISTRY_KINDS


def cec_namespace(doc: Mapping[str, Any]) -> str:
    """A CEC's namespace ("default" when unset); "" for a clusterwide one."""
    if doc.get("kind") == "CiliumClusterwideEnvoyConfig":
        return ""
    return str((doc.get("metadata") or {}).get("namespace") or "default")


def cec_name(doc: Mapping[str, Any]) -> str:
    """`KIND NS/NAME` of a CEC, for messages."""
    ns = cec_namespace(doc)
    return f"{doc.get('kind')} {ns + '/' if ns else ''}{(doc.get('metadata') or {}).get('name') or '(no name)'}"


def resources(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `@type`-tagged items of `spec.resources`."""
    items = (doc.get("spec") or {}).get("resources") or []
    return [i for i in items if isinstance(i, dict) and "@type" in i] if isinstance(items, list) else []


def service_refs(doc: Mapping[str, Any]) -> list[ServiceRef]:
    """`spec.services` and `spec.backendServices`; an entry without a namespace is in
    the CiliumEnvoyConfig's (`default` for a CiliumClusterwideEnvoyConfig)."""
    spec = doc.get("spec") or {}
    clusterwide = doc.get("kind") == "CiliumClusterwideEnvoyConfig"
    own = "default" if clusterwide else str((doc.get("metadata") or {}).get("namespace") or "default")
    out = []
    for key, ports_key in (("services", "ports"), ("backendServices", "number")):
        for s in spec.get(key) or []:
            if not isinstance(s, Mapping) or not s.get("name"):
                raise ValueError(f"{cec_name(doc)}: spec.{key}[]: entry without a name: {s!r}")
            ns = str(s.get("namespace") or own)
            ports = frozenset(str(p) for p in s.get(ports_key) or [])
            out.append(ServiceRef(ns, str(s["name"]), ports))
    return out


def ports_by_service(refs: Iterable[ServiceRef]) -> dict[str, frozenset[str]]:
    """Service key -> the union of the ports every reference selects (cilium-agent
    unions them over all CECs; one reference without ports adds none)."""
    out: dict[str, frozenset[str]] = {}
    for r in refs:
        out[r.key] = out.get(r.key, frozenset()) | r.ports
    return out


def registry(docs: Iterable[Any], source: str = "") -> tuple[Registry, list[str]]:
    """Services and their ready endpoints from Service/EndpointSlice/Pod documents;
    also the lines about what was not understood (`KIND NS/NAME: field: problem`)."""
    objs = ObjectSet()
    parse_documents([d for d in docs if is_registry_object(d)], source, objs)
    reg = from_k8s(objs)
    return reg, list(objs.warnings)


def _backends(svc: Service, ports: frozenset[str]) -> dict[str, set[tuple[str, int]]]:
    """Port label (`*`, a port name or number) -> backend (ip, port) set, as
    cilium-agent partitions a Service's backends."""
    out: dict[str, set[tuple[str, int]]] = {}
    for sp in svc.ports:
        if not ports:
            label: str | None = ANY_PORT
        elif sp.name and sp.name in ports:
            label = sp.name
        else:
            label = str(sp.number) if str(sp.number) in ports else None
        if label is None:
            continue
        for ep in svc.endpoints:
            out.setdefault(label, set()).add((ep.ip, int(ep.ports.get(sp.number, sp.target or sp.number))))
    return out


def load_assignments(wanted: Mapping[str, frozenset[str]], reg: Registry) -> list[dict[str, Any]]:
    """The ClusterLoadAssignments (proto-JSON) cilium-agent publishes for ``wanted``
    (service key -> selected ports, `ports_by_service`), sorted by name."""
    out = []
    for key, ports in sorted(wanted.items()):
        svc = _service(reg, key)
        if svc is None:
            continue
        for label, addrs in sorted(_backends(svc, ports).items()):
            eps = [{"endpoint": {"address": {"socketAddress": {"address": ip, "portValue": port}}}}
                   for ip, port in sorted(addrs, key=lambda a: f"{a[0]}:{a[1]}")]
            names = [f"{key}:{label}"] + ([key] if label == ANY_PORT else [])
            out += [{"@type": ENDPOINT, "clusterName": n, "endpoints": [{"lbEndpoints": eps}]}
                    for n in names]
    return out


def _service(reg: Registry, key: str) -> Service | None:
    ns, _, name = key.partition("/")
    return reg.resolve(name, ns)


def eds_name(cluster: Mapping[str, Any]) -> str | None:
    """The EDS service name of an EDS cluster (raw dict, snake or camel case), else None."""
    if cluster.get("type") != "EDS":
        return None
    eds = cluster.get("eds_cluster_config") or cluster.get("edsClusterConfig") or {}
    return str(eds.get("service_name") or eds.get("serviceName") or cluster.get("name") or "")


def why_missing(name: str, wanted: Mapping[str, frozenset[str]], reg: Registry) -> str:
    """Why cilium-agent would publish no assignment ``name`` (an EDS service name)."""
    key, _, port = name.partition(":")
    if key.count("/") != 1:  # not NS/SERVICE: no spec.services entry can give it
        return (f"'{key}' names no Service: cilium-agent publishes 'NS/SERVICE' and "
                "'NS/SERVICE:PORT', and qualifies a cluster name without '/' as NS/CEC/NAME; "
                "set eds_cluster_config.service_name")
    if key not in wanted:
        return f"'{key}' is not in spec.services/backendServices"
    svc = _service(reg, key)
    if svc is None:
        return f"Service '{key}' not in the input"
    if not svc.endpoints:
        return f"Service '{key}' has no ready endpoint"
    selected = wanted[key]
    if port and port != ANY_PORT and port not in selected:
        return (f"port '{port}' of Service '{key}' not selected in services[].ports/"
                "backendServices[].number")
    if not port and selected:
        return f"Service '{key}' has ports selected: cilium-agent publishes only 'NAME:PORT'"
    return f"Service '{key}' has no port '{port}'"


def assignments(refs: Iterable[ServiceRef], reg: Registry, clusters: Iterable[Mapping[str, Any]]
                ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """What cilium-agent publishes for the Services `refs` name, from `reg` (the
    `registry` of a directory's Service/EndpointSlice/Pod objects, built once by
    the caller): (assignments, EDS service name of each of `clusters` left
    without one -> why). Called by `l7fp serve` (cilium_files.endpoints) and
    `l7fp split` (inputs_cilium); reads `reg` only."""
    wanted = ports_by_service(refs)
    clas = load_assignments(wanted, reg)
    return clas, missing(clusters, wanted, reg, (c["clusterName"] for c in clas))


def missing(cluster_items: Iterable[Mapping[str, Any]], wanted: Mapping[str, frozenset[str]],
            reg: Registry, published: Iterable[str]) -> dict[str, str]:
    """EDS service name -> why it has no assignment, for the EDS clusters of
    ``cluster_items`` (raw Cluster dicts) not in ``published``."""
    have = set(published)
    out = {}
    for c in cluster_items:
        name = eds_name(c)
        if name and name not in have:
            out[name] = why_missing(name, wanted, reg)
    return out


def proxy_port(qualified_listener: str) -> int:
    """The port L7FP binds a CEC listener without an address to (cilium-agent
    allocates one from its proxy port range): stable per listener name."""
    lo, hi = PROXY_PORTS
    return lo + zlib.crc32(qualified_listener.encode()) % (hi - lo)


def with_address(listener: dict[str, Any], qualified: str) -> dict[str, Any]:
    """A listener without an address bound to 127.0.0.1:proxy_port, as cilium-agent
    binds its L7 load-balancing listeners; one with an address unchanged."""
    if listener.get("address") or listener.get("internal_listener") or listener.get("internalListener"):
        return listener
    addr = {"socket_address": {"address": "127.0.0.1", "port_value": proxy_port(qualified)}}
    return dict(listener, address=addr)
