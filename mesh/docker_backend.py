"""`l7fp mesh up|down --backend docker`: the same mesh as Docker containers.

Called by `mesh.cli`. Uses the Docker SDK (`docker` package) against the
engine of `DOCKER_HOST` / the local socket. The containers are exactly the
services of the compose project `mesh.compose` generates (one source of
truth), written to /run/l7fp/mesh/<name>/docker and created in dependency
order: network, control plane, apps, iptables init (run to completion),
sidecars. Every object is labelled `l7fp.mesh=<name>`; `down` removes by label.
The project's machines have no Docker engine: only the translation and the
"no engine" error are tested here (docs/mesh.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh import compose, spec
from mesh.teardown import state_dir

LABEL = "l7fp.mesh"
REPO = Path(__file__).resolve().parent.parent


class DockerBackendError(RuntimeError):
    """No engine, or the engine refused something; the message says which."""


def client() -> Any:
    import docker
    try:
        c = docker.from_env(timeout=10)
        c.ping()
    except Exception as exc:  # DockerException, connection refused, missing socket
        raise DockerBackendError(
            f"no Docker engine reachable ({exc.__class__.__name__}: {exc}); the local runner "
            "(`l7fp mesh up` without --backend) needs none") from exc
    return c


def container_kwargs(name: str, svc: dict[str, Any], mesh: str, base: Path) -> dict[str, Any]:
    """docker SDK `containers.run` arguments for one compose service."""
    kw: dict[str, Any] = {"name": f"l7fp-{mesh}-{name}", "image": svc["image"], "detach": True,
                          "command": svc.get("command"), "labels": {LABEL: mesh},
                          "environment": svc.get("environment")}
    if "network_mode" in svc:
        kw["network_mode"] = "container:" + f"l7fp-{mesh}-" + svc["network_mode"].split(":", 1)[1]
    for key in ("user", "privileged", "pid", "cap_add"):
        if key in svc:
            kw["pid_mode" if key == "pid" else key] = svc[key]
    vols = {}
    for v in svc.get("volumes", []):
        src, dst, *mode = v.split(":")
        host = str((base / src).resolve()) if src.startswith(".") else src
        vols[host] = {"bind": dst, "mode": mode[0] if mode else "rw"}
    if vols:
        kw["volumes"] = vols
    ports = {}
    for p in svc.get("ports", []):  # "HOST_IP:HOST_PORT:CONTAINER_PORT"
        host_ip, host_port, ctr_port = p.split(":")
        ports[f"{ctr_port}/tcp"] = (host_ip, int(host_port))
    if ports:
        kw["ports"] = ports
    if svc.get("restart") == "unless-stopped":
        kw["restart_policy"] = {"Name": "unless-stopped"}
    return {k: v for k, v in kw.items() if v is not None}


def ordered(doc: dict[str, Any]) -> list[str]:
    """Control plane, apps, inits, sidecars: the order `depends_on` asks for."""
    names = list(doc["services"])
    rank = {"control-plane": 0}
    return sorted(names, key=lambda n: (rank.get(n, 3 if n.endswith("-envoy") else
                                             2 if n.endswith("-init") else 1), n))


def up(mesh_spec: spec.MeshSpec, docker_client: Any = None) -> Path:
    """Create the mesh's containers; return the project directory."""
    c = docker_client or client()
    out = state_dir(mesh_spec.name) / "docker"
    compose.write(mesh_spec, out)
    doc, _ = compose.project(mesh_spec)
    ipam_cfg = doc["networks"]["mesh"]["ipam"]["config"][0]
    import docker.types as dt
    net = c.networks.create(f"l7fp-{mesh_spec.name}", driver="bridge", labels={LABEL: mesh_spec.name},
                            ipam=dt.IPAMConfig(pool_configs=[dt.IPAMPool(**ipam_cfg)]))
    if not c.images.list(name=compose.L7FP_IMAGE):
        c.images.build(path=str(REPO), dockerfile="compose/Dockerfile", tag=compose.L7FP_IMAGE)
    try:
        for name in ordered(doc):
            svc = doc["services"][name]
            kw = container_kwargs(name, svc, mesh_spec.name, out)
            if "networks" in svc:  # attach with the pod's fixed address and service alias
                kw["network"] = net.name
                ctr = c.containers.create(**{k: v for k, v in kw.items() if k != "detach"})
                net.disconnect(ctr)
                m = svc["networks"]["mesh"]
                net.connect(ctr, ipv4_address=m["ipv4_address"], aliases=m.get("aliases"))
                ctr.start()
            else:
                ctr = c.containers.run(**kw)
            if name.endswith("-init") and ctr.wait(timeout=60).get("StatusCode") != 0:
                raise DockerBackendError(f"{name} failed: {ctr.logs()[-500:]!r}")
    except Exception:
        down(mesh_spec.name, c)
        raise
    return out


def down(mesh: str, docker_client: Any = None) -> list[str]:
    """Remove every container and network labelled with `mesh`."""
    c = docker_client or client()
    done = []
    for ctr in c.containers.list(all=True, filters={"label": f"{LABEL}={mesh}"}):
        ctr.remove(force=True)
        done.append(f"container {ctr.name}")
    for net in c.networks.list(filters={"label": f"{LABEL}={mesh}"}):
        net.remove()
        done.append(f"network {net.name}")
    return done
