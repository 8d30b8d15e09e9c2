"""A mesh's concrete layout: pods with addresses and node ids, service VIPs, gateways.

Computed by the mesh daemon from a validated `MeshSpec` and a free subnet,
then written into state.json (docs/contracts.md) for the fast-path agent, the
benchmark harness and `mesh status/exec`. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh import naming
from mesh.envoyconf import PodInfo
from mesh.netrules import ServiceAddr
from mesh.spec import ENVOY_ADMIN_PORT, MeshSpec


@dataclass(frozen=True)
class Pod:
    name: str
    service: str
    index: int
    ip: str
    netns: str
    node_id: str
    ports: tuple[int, ...]
    deployment: str = ""  # the mesh file entry the pod comes from
    labels: tuple[tuple[str, str], ...] = ()
    gateway: bool = False  # an ingress gateway's pod: a router Envoy, no app, no capture

    def info(self) -> PodInfo:
        return PodInfo(self.name, self.service, self.ip, self.node_id, self.labels)


@dataclass(frozen=True)
class Topology:
    spec: MeshSpec
    subnet: naming.Subnet
    pods: tuple[Pod, ...]
    services: tuple[ServiceAddr, ...]
    gateways: tuple[Pod, ...] = ()  # after the service pods (addresses, veths go on counting)

    def all_pods(self) -> tuple[Pod, ...]:
        """Every pod with a netns, a cgroup and an Envoy: service pods, then gateways."""
        return self.pods + self.gateways


def build(spec: MeshSpec, subnet: naming.Subnet) -> Topology:
    pods = []
    for i, (pod_name, svc) in enumerate(spec.pod_names()):
        ip = subnet.pod_ip(i)
        pods.append(Pod(pod_name, svc.service, i, ip, naming.netns_name(spec.name, pod_name),
                        naming.node_id(ip, pod_name, spec.namespace), svc.ports, svc.name,
                        tuple(sorted(svc.labels.items()))))
    gateways = []
    for i, gw in enumerate(spec.gateways.values(), start=len(pods)):
        ip = subnet.pod_ip(i)
        gateways.append(Pod(gw.pod, gw.name, i, ip, naming.netns_name(spec.name, gw.pod),
                            naming.node_id(ip, gw.pod, spec.namespace, "router"), gw.ports,
                            gw.name, tuple(sorted(gw.labels.items())), gateway=True))
    services = []
    ns = spec.namespace
    for j, group in enumerate(spec.groups()):
        services.append(ServiceAddr(
            group, subnet.vip(j), spec.ports_of(group),
            tuple(p.ip for p in pods if p.service == group),
            (group, f"{group}.{ns}", f"{group}.{ns}.svc", naming.fqdn(group, ns))))
    return Topology(spec, subnet, tuple(pods), tuple(services), tuple(gateways))


def _pod_doc(topo: Topology, p: Pod, cgroups: dict[str, str],
             pids: dict[str, dict[str, int]]) -> dict[str, Any]:
    labels = dict(p.labels) if p.gateway else topo.spec.services[p.deployment].labels
    return {"name": p.name, "service": p.service, "namespace": topo.spec.namespace,
            "netns": p.netns, "cgroup": cgroups[p.name], "ip": p.ip, "ports": list(p.ports),
            "node_id": p.node_id, "envoy_admin": ENVOY_ADMIN_PORT, "labels": labels,
            "deployment": p.deployment, "pids": pids.get(p.name, {})}


def state_doc(topo: Topology, *, pid: int, cgroups: dict[str, str], pids: dict[str, dict[str, int]],
              xds: str | None, admin: str | None, config_dir: str, extra: dict[str, Any],
              gateways_not_ready: dict[str, str] | None = None) -> dict:
    """The state.json document of docs/contracts.md (plus documented extras).
    `gateways` lists the gateway pods (not in `pods`: they are no service's
    endpoints and the fast path has no node for them), each `ready` once its
    Envoy listens on its ports, else `not_ready` says why
    (`gateways_not_ready`: pod -> why; a gateway absent from it is ready)."""
    spec = topo.spec
    waiting = gateways_not_ready or {}
    return {
        "name": spec.name, "pid": pid, "xds": xds, "admin": admin, "config_dir": config_dir,
        "pods": [_pod_doc(topo, p, cgroups, pids) for p in topo.pods],
        "gateways": [{**_pod_doc(topo, p, cgroups, pids), "ready": p.name not in waiting,
                      "not_ready": waiting.get(p.name, "")} for p in topo.gateways],
        "services": [{"name": s.name, "vip": s.vip, "ports": list(s.ports),
                      "pod_ips": list(s.pod_ips), "hostnames": list(s.names)}
                     for s in topo.services],
        "mesh_file": str(spec.path), "bridge": naming.bridge_name(spec.name),
        "gateway": topo.subnet.gateway, "subnet": topo.subnet.cidr, **extra,
    }
