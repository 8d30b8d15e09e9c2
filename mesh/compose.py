"""A mesh file as a docker-compose project, for Docker users.

Called by `l7fp mesh compose FILE -o DIR` (and the tests, which check the
committed compose/demo/docker/ is what this generates and that
`docker-compose config` accepts it). Pure apart from writing files.

Pod = an app container with a fixed address on the `mesh` network
(198.18.<K>.0/24) and a network alias = its service name (Docker's DNS gives
the pod addresses, round robin over replicas); `<pod>-init` loads the same
istio-iptables rules as the local runner into the app's network namespace
(NET_ADMIN, then exits); `<pod>-envoy` is `envoyproxy/envoy` as uid 1337 in
that namespace, bootstrapped to the control plane container, which runs
`l7fp serve` on the generated config directory with the privileges BPF needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mesh import configdir, envoyconf, naming, netrules, topology
from mesh.spec import SIDECAR_UID, MeshFileError, MeshSpec

ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
L7FP_IMAGE = "l7fp:dev"
DOCKER_OCTET = 250  # 198.18.250.0/24: one Docker network per project
CONTROL_PLANE_IP = f"198.18.{DOCKER_OCTET}.254"
XDS_PORT = 15010


def project(spec: MeshSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """(docker-compose document, {relative path: file text}) for `spec`."""
    if spec.gateways:
        raise MeshFileError(f"{spec.path}: gateways: not in the Docker files (the local "
                            "runner only: `l7fp mesh up`)")
    topo = topology.build(spec, naming.Subnet(DOCKER_OCTET))
    files: dict[str, str] = {}
    services: dict[str, Any] = {"control-plane": _control_plane()}
    for rel, text in _xds_files(spec, topo).items():
        files[f"docker/xds/{rel}"] = text
    for pod in topo.pods:
        svc = spec.services[pod.deployment]
        boot = envoyconf.sidecar_bootstrap(pod.info(), f"{pod.service}.{spec.namespace}",
                                           envoyconf.Delivery("ads"), (CONTROL_PLANE_IP, XDS_PORT))
        files[f"docker/bootstrap/{pod.name}.yaml"] = yaml.safe_dump(boot, sort_keys=False)
        files[f"docker/iptables/{pod.name}.rules"] = netrules.pod_nat_table(
            naming.iptables_comment(spec.name), [], sidecar=True)
        services[pod.name] = _app(spec, pod, svc.app, svc.command, svc.env, files)
        services[f"{pod.name}-init"] = {
            "image": L7FP_IMAGE, "network_mode": f"service:{pod.name}", "cap_add": ["NET_ADMIN"],
            "volumes": ["./docker/iptables:/etc/l7fp/iptables:ro"],
            "command": ["iptables-restore", f"/etc/l7fp/iptables/{pod.name}.rules"],
            "depends_on": [pod.name], "restart": "no"}
        services[f"{pod.name}-envoy"] = {
            "image": ENVOY_IMAGE, "network_mode": f"service:{pod.name}",
            "user": f"{SIDECAR_UID}:{SIDECAR_UID}",
            "volumes": ["./docker/bootstrap:/etc/l7fp/bootstrap:ro"],
            "command": ["envoy", "-c", f"/etc/l7fp/bootstrap/{pod.name}.yaml", "--concurrency", "1",
                        "--drain-time-s", "1"],
            "depends_on": {f"{pod.name}-init": {"condition": "service_completed_successfully"},
                           "control-plane": {"condition": "service_started"}},
            "restart": "unless-stopped"}
    doc = {"services": services,
           "networks": {"mesh": {"driver": "bridge", "ipam": {"config": [
               {"subnet": f"198.18.{DOCKER_OCTET}.0/24", "gateway": f"198.18.{DOCKER_OCTET}.1"}]}}}}
    return doc, files


def _control_plane() -> dict[str, Any]:
    return {
        "image": L7FP_IMAGE, "build": {"context": "../..", "dockerfile": "compose/Dockerfile"},
        "command": ["l7fp", "serve", "--config", "/etc/l7fp/xds", "--xds-port", str(XDS_PORT),
                    "--admin-address", "0.0.0.0", "--fastpath", "auto"],
        # BPF: programs, maps, cgroup attachment, BTF and kernel headers for BCC.
        "privileged": True, "pid": "host",
        "cap_add": ["SYS_ADMIN", "BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"],
        "volumes": ["./docker/xds:/etc/l7fp/xds:ro", "/sys/fs/bpf:/sys/fs/bpf",
                    "/sys/fs/cgroup:/sys/fs/cgroup", "/sys/kernel/btf:/sys/kernel/btf:ro",
                    "/lib/modules:/lib/modules:ro", "/usr/src:/usr/src:ro"],
        "networks": {"mesh": {"ipv4_address": CONTROL_PLANE_IP}},
        "ports": ["127.0.0.1:15014:15014"]}


def _app(spec: MeshSpec, pod: topology.Pod, app: str, command: tuple[str, ...],
         env: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
    net = {"mesh": {"ipv4_address": pod.ip, "aliases": [pod.service]}}
    environment = {**env, "POD_NAME": pod.name, "POD_IP": pod.ip, "SERVICE_NAME": pod.deployment,
                   "MESH_NAMESPACE": spec.namespace}
    if app == "direct_response":
        svc = spec.services[pod.deployment]
        files[f"docker/bootstrap/{pod.name}-app.yaml"] = yaml.safe_dump(
            envoyconf.direct_response_bootstrap(svc.name, svc.ports), sort_keys=False)
        return {"image": ENVOY_IMAGE, "networks": net, "environment": environment,
                "volumes": ["./docker/bootstrap:/etc/l7fp/bootstrap:ro"],
                "command": ["envoy", "-c", f"/etc/l7fp/bootstrap/{pod.name}-app.yaml",
                            "--concurrency", "1", "--base-id", "1"]}
    cmd = [a.replace("${PYTHON}", "python").replace("${ENVOY}", "envoy") for a in command]
    return {"image": L7FP_IMAGE, "networks": net, "environment": environment, "command": cmd}


def _xds_files(spec: MeshSpec, topo: topology.Topology) -> dict[str, str]:
    delivery = envoyconf.Delivery("ads")
    out = {"mesh.json": _doc({"id": "sidecar~*"},
                             envoyconf.shared_resources(spec, list(topo.services), delivery))}
    for svc in spec.groups():
        out[f"svc-{svc}.json"] = _doc({"cluster": f"{svc}.{spec.namespace}"},
                                      envoyconf.service_resources(spec, svc, delivery))
    return out


def _doc(selector: dict[str, str], res: dict[str, list[dict[str, Any]]]) -> str:
    order = [envoyconf.CLUSTER, envoyconf.CLA, envoyconf.ROUTE, envoyconf.LISTENER]
    return json.dumps({"node_selector": selector,
                       "resources": [r for t in order for r in res.get(t, [])]},
                      indent=1, sort_keys=True) + "\n"


def write(spec: MeshSpec, out_dir: Path, compose_name: str = "docker-compose.yml") -> list[Path]:
    """Write the project under `out_dir`; return the files written."""
    doc, files = project(spec)
    header = (f"# Generated by `l7fp mesh compose {spec.path.name} -o DIR` from the mesh "
              "file; do not edit.\n# Validated with `docker-compose config`, not run, on the "
              "project's machines (no Docker engine there). See docs/mesh.md.\n")
    written = [out_dir / compose_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    configdir.atomic_write(out_dir / compose_name, header + yaml.safe_dump(doc, sort_keys=False))
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        configdir.atomic_write(path, text)
        written.append(path)
    return written
