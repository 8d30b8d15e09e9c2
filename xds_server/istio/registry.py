"""The mesh's services and endpoints (istiod's service registry, offline).

Built by `from_mesh_state` (the mesh state/mesh file format of
docs/contracts.md: `services:` and `pods:`), by `from_k8s` (Kubernetes
`Service`, `EndpointSlice` and `Pod` objects) and extended by `add_service_entries`
(Istio `ServiceEntry`). Read by `xds_server.istio.sidecar` to generate
clusters, endpoints and listeners. Owns nothing else.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server import yaml_errors

from .objects import DEFAULT_NAMESPACE, Obj, ObjectSet, as_list, check_fields

DOMAIN = "svc.cluster.local"
TCP_PROTOCOLS = frozenset({"tcp", "tls", "mongo", "mysql", "redis", "https"})


@dataclass(frozen=True)
class Port:
    number: int
    name: str = ""
    protocol: str = "http"
    target: int = 0

    @property
    def is_http(self) -> bool:
        return self.protocol not in TCP_PROTOCOLS


@dataclass(frozen=True)
class Endpoint:
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    pod: str = ""
    service_account: str = "default"
    ports: Mapping[int, int] = field(default_factory=dict)  # service port -> endpoint port


@dataclass
class Service:
    name: str
    namespace: str
    ports: list[Port]
    vip: str = ""
    hostname: str = ""
    endpoints: list[Endpoint] = field(default_factory=list)
    resolution: str = "EDS"  # EDS | DNS | PASSTHROUGH
    external: bool = False

    def __post_init__(self) -> None:
        if not self.hostname:
            self.hostname = f"{self.name}.{self.namespace}.{DOMAIN}"

    def port(self, number: int) -> Port | None:
        return next((p for p in self.ports if p.number == number), None)


@dataclass(frozen=True)
class Workload:
    """One pod: what a sidecar's node id resolves to."""

    name: str
    namespace: str
    ip: str
    labels: Mapping[str, str]
    service_account: str = "default"
    service: str = ""  # the service this pod backs, when known (mesh files)

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.name}.{self.namespace}~{self.namespace}.{DOMAIN}"


@dataclass
class Registry:
    services: dict[str, Service] = field(default_factory=dict)  # by hostname
    workloads: list[Workload] = field(default_factory=list)

    def add(self, svc: Service) -> None:
        self.services[svc.hostname] = svc

    def resolve(self, host: str, namespace: str) -> Service | None:
        """Istio short-name resolution: `reviews` in NS -> reviews.NS.svc.cluster.local."""
        if host in self.services:
            return self.services[host]
        parts = host.split(".")
        if len(parts) == 1:
            return self.services.get(f"{host}.{namespace}.{DOMAIN}")
        if len(parts) == 2:
            return self.services.get(f"{host}.{DOMAIN}")
        if len(parts) == 3 and parts[2] == "svc":
            return self.services.get(f"{host}.cluster.local")
        return None

    def fqdn(self, host: str, namespace: str) -> str:
        svc = self.resolve(host, namespace)
        if svc is not None:
            return svc.hostname
        return f"{host}.{namespace}.{DOMAIN}" if "." not in host and host != "*" else host

    def workload_for_node(self, node_id: str) -> Workload | None:
        """Find the pod of an Istio node id `sidecar~IP~POD.NS~NS.svc.cluster.local`."""
        parts = node_id.split("~")
        if len(parts) != 4:
            return None
        ip, podns = parts[1], parts[2]
        for w in self.workloads:
            if w.ip == ip or f"{w.name}.{w.namespace}" == podns:
                return w
        return None

    def learn(self, pod: str, namespace: str, ip: str, labels: Mapping[str, str]) -> bool:
        """A sidecar told us its pod's IP (node id) and labels; True if that is news.

        Mesh files name pods but not addresses (the runner picks them), so the
        registry completes itself as sidecars connect.
        """
        for i, w in enumerate(self.workloads):
            if w.name != pod or w.namespace != namespace:
                continue
            new_labels = dict(w.labels) | dict(labels)
            if w.ip == ip and new_labels == dict(w.labels):
                return False
            self.workloads[i] = Workload(w.name, w.namespace, ip, new_labels, w.service_account,
                                         w.service)
            svc = self.resolve(w.service, namespace) if w.service else None
            if svc is not None and ip:
                svc.endpoints = [e for e in svc.endpoints if e.pod != pod]
                svc.endpoints.append(Endpoint(ip, new_labels, pod, w.service_account))
            return True
        return False

    def workloads_with_identity(self, namespace: str | None, sa: str | None) -> list[Workload]:
        return [w for w in self.workloads
                if (namespace is None or w.namespace == namespace)
                and (sa is None or w.service_account == sa)]


def _protocol(name: str, app_protocol: str | None = None) -> str:
    if app_protocol:
        return app_protocol.lower().split("/")[-1].replace("kubernetes.io/", "")
    prefix = name.split("-", 1)[0].lower()
    return prefix if prefix in TCP_PROTOCOLS | {"http", "http2", "grpc", "grpc-web"} else "http"


STATE_ROOT = Path("/run/l7fp/mesh")


def from_mesh_file(path: str | Path) -> Registry:
    """A local-mesh file (docs/mesh.md: `services:` mapping) or a state file (`pods:` list).

    For a mesh file, pods are `<service>-<i>` per replica; their addresses come
    from the running mesh's state.json when it exists, else from the sidecars'
    node ids as they connect (`Registry.learn`).
    """
    try:  # every failure one ValueError naming the file: `istio check`, `serve` print it
        text = yaml_errors.read_text(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid YAML/JSON: {yaml_errors.problem(exc)}") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with services:")
    if isinstance(data.get("services"), Mapping):
        return _from_mesh_spec(Path(path), data)
    return from_mesh_state(path, data)


def _from_mesh_spec(path: Path, data: Mapping[str, Any]) -> Registry:
    name = str(data.get("name") or path.parent.name)
    ns = str(data.get("namespace") or name)
    state = STATE_ROOT / name / "state.json"
    if state.is_file():
        try:
            reg = from_mesh_state(state)
            if reg.services:
                return reg
        except (ValueError, OSError, KeyError):
            pass  # mesh still starting: fall back to learning addresses
    reg = Registry()
    for sname, svc in data["services"].items():
        svc = svc or {}
        ports = [_mesh_port(p) for p in svc.get("ports") or []]
        reg.add(Service(str(sname), ns, ports))
        for i in range(int(svc.get("replicas", 1))):
            reg.workloads.append(Workload(f"{sname}-{i}", ns, "", {"app": str(sname)},
                                          service=str(sname)))
    return reg


def from_mesh_state(path: str | Path, data: Mapping[str, Any] | None = None) -> Registry:
    """Read the state.json format (docs/contracts.md, "Mesh state").

    Pods may carry `labels:` (default `{app: SERVICE}`) and
    `service_account:`; services may carry `namespace:`.
    """
    if data is None:
        text = yaml_errors.read_text(path)
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with services: and pods:")
    reg = Registry()
    pods = data.get("pods") or []
    default_ns = str(data.get("namespace") or (pods[0].get("namespace") if pods else None)
                     or DEFAULT_NAMESPACE)
    for svc in data.get("services") or []:
        if "name" not in svc:
            raise ValueError(f"{path}: services[]: missing name in {svc!r}")
        ns = str(svc.get("namespace") or default_ns)
        ports = [_mesh_port(p) for p in svc.get("ports") or []]
        reg.add(Service(svc["name"], ns, ports, vip=str(svc.get("vip") or "")))
    for i, pod in enumerate(pods):
        for key in ("name", "ip"):
            if key not in pod:
                raise ValueError(f"{path}: pods[{i}]: missing {key}")
        service = pod.get("service") or ""
        ns = str(pod.get("namespace") or default_ns)
        labels = dict(pod.get("labels") or {"app": service})
        sa = str(pod.get("service_account") or pod.get("serviceAccount") or "default")
        reg.workloads.append(Workload(pod["name"], ns, pod["ip"], labels, sa, str(service)))
        svc_obj = reg.resolve(service, ns) if service else None
        if svc_obj is not None:
            svc_obj.endpoints.append(Endpoint(pod["ip"], labels, pod["name"], sa))
    return reg


def _mesh_port(p: Any) -> Port:
    if isinstance(p, int):
        return Port(p, f"http-{p}", "http", p)
    number = int(p["port"])
    name = str(p.get("name") or f"http-{number}")
    return Port(number, name, _protocol(name, p.get("protocol")), int(p.get("target_port") or number))


def from_k8s(objs: ObjectSet, reg: Registry | None = None) -> Registry:
    """Services, their endpoints (EndpointSlice, or Pods matching the selector)."""
    reg = reg if reg is not None else Registry()
    w = objs.warnings
    pods = [_pod(o) for o in objs.of("Pod")]
    for p in pods:
        known = next((w for w in reg.workloads if w.name == p.name and w.namespace == p.namespace), None)
        if known is None and p.ip:
            reg.workloads.append(p)
        elif known is not None:  # a label overlay for a mesh-file pod
            reg.learn(p.name, p.namespace, p.ip or known.ip, p.labels)
    for o in objs.of("Service"):
        spec = check_fields(w, o, "spec", o.spec, {
            "ports", "selector", "clusterIP", "clusterIPs", "type", "sessionAffinity",
            "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy", "publishNotReadyAddresses"})
        ports = []
        for i, p in enumerate(as_list(w, o, "spec.ports", spec.get("ports"))):
            target = p.get("targetPort", p.get("port"))
            if not isinstance(target, int):
                w.add(o, f"spec.ports[{i}].targetPort", "named target port; using the service port")
                target = p.get("port")
            name = str(p.get("name") or "")
            ports.append(Port(int(p["port"]), name, _protocol(name, p.get("appProtocol")), int(target)))
        vip = str(spec.get("clusterIP") or "")
        svc = Service(o.name, o.namespace, ports, vip="" if vip == "None" else vip)
        selector = spec.get("selector") or {}
        if selector:
            for pod in pods:
                if pod.namespace == o.namespace and pod.ip and _matches(selector, pod.labels):
                    svc.endpoints.append(Endpoint(pod.ip, pod.labels, pod.name, pod.service_account))
        reg.add(svc)
    for o in objs.of("EndpointSlice"):
        _add_slice(o, objs, reg, pods)
    return reg


def _pod(o: Obj) -> Workload:
    status = o.raw.get("status") or {}
    sa = str(o.spec.get("serviceAccountName") or "default")
    return Workload(o.name, o.namespace, str(status.get("podIP") or ""), dict(o.labels), sa)


def _add_slice(o: Obj, objs: ObjectSet, reg: Registry, pods: list[Workload]) -> None:
    w = objs.warnings
    svc_name = o.labels.get("kubernetes.io/service-name")
    svc = reg.resolve(str(svc_name), o.namespace) if svc_name else None
    if svc is None:
        w.add(o, "metadata.labels[kubernetes.io/service-name]", "names no known Service; ignored")
        return
    slice_ports = {str(p.get("name") or ""): int(p["port"]) for p in o.raw.get("ports") or []}
    port_map = {sp.number: slice_ports[sp.name] for sp in svc.ports if sp.name in slice_ports}
    known = {e.ip for e in svc.endpoints}
    for ep in as_list(w, o, "endpoints", o.raw.get("endpoints")):
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        ref = (ep.get("targetRef") or {}).get("name", "")
        pod = next((p for p in pods if p.name == ref and p.namespace == o.namespace), None)
        labels = dict(pod.labels) if pod else {}
        for addr in ep.get("addresses") or []:
            if addr not in known:
                sa = pod.service_account if pod else "default"
                svc.endpoints.append(Endpoint(addr, labels, ref, sa, port_map))
                known.add(addr)


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def add_service_entries(objs: ObjectSet, reg: Registry) -> None:
    """ServiceEntry hosts become services (MESH_INTERNAL/EXTERNAL alike)."""
    w = objs.warnings
    for o in objs.of("ServiceEntry"):
        spec = check_fields(w, o, "spec", o.spec, {
            "hosts", "addresses", "ports", "location", "resolution", "endpoints", "exportTo",
            "workloadSelector"})
        if "workloadSelector" in spec:
            w.add(o, "spec.workloadSelector", "WorkloadEntry selection unsupported; ignored")
        if spec.get("exportTo") and "*" not in map(str, spec["exportTo"]):
            w.add(o, "spec.exportTo", "namespace-scoped ServiceEntries are unsupported; "
                  "visible to every namespace")
        ports = [Port(int(p["number"]), str(p.get("name") or ""),
                      _protocol(str(p.get("name") or ""), p.get("protocol")),
                      int(p.get("targetPort") or p["number"]))
                 for p in as_list(w, o, "spec.ports", spec.get("ports"))]
        resolution = str(spec.get("resolution") or "NONE").upper()
        addresses = [a for a in spec.get("addresses") or [] if _is_ip(a)]
        for host in map(str, as_list(w, o, "spec.hosts", spec.get("hosts"))):
            svc = Service(host.split(".")[0], o.namespace, ports, hostname=host,
                          vip=addresses[0] if addresses else "",
                          external=spec.get("location") != "MESH_INTERNAL")
            svc.resolution = {"DNS": "DNS", "DNS_ROUND_ROBIN": "DNS", "STATIC": "EDS"}.get(
                resolution, "PASSTHROUGH")
            for i, ep in enumerate(as_list(w, o, "spec.endpoints", spec.get("endpoints"))):
                check_fields(w, o, f"spec.endpoints[{i}]", ep, {"address", "ports", "labels"})
                if svc.resolution == "EDS" and not _is_ip(str(ep.get("address", ""))):
                    w.add(o, f"spec.endpoints[{i}].address", f"{ep.get('address')!r} is not an IP "
                          "address (resolution STATIC); endpoint ignored")
                    continue
                ep_ports = ep.get("ports") or {}  # port name -> endpoint port
                svc.endpoints.append(Endpoint(str(ep["address"]), dict(ep.get("labels") or {}),
                                              ports={p.number: int(ep_ports[p.name])
                                                     for p in ports if p.name in ep_ports}))
            if svc.resolution == "DNS" and not svc.endpoints:
                svc.endpoints.append(Endpoint(host))
            reg.add(svc)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
