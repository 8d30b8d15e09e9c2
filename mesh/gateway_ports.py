"""A local-mesh gateway's `ports:` checked against the Gateway servers that
select it, before `mesh up` waits on them.

A gateway pod is ready when its Envoy listens on every port of its `ports:`
(mesh.daemon.Daemon.pod_ready). A port that no server of a selecting Gateway
has never opens, so `up` used to wait until its --timeout. mesh.daemon calls
`unserved_ports` once state.json (the pods' addresses) is written, with the
registry the control plane reads from it, and stops at once with a message
naming the gateway, the ports and the ports its Gateways do serve. A gateway
that no Gateway selects is not an error here: `up` reports it not ready
(Daemon.unselected).
"""

from __future__ import annotations

from pathlib import Path

from mesh.topology import Topology
from xds_server import istio
from xds_server.istio import gateway
from xds_server.istio.registry import Workload


def unserved_ports(topo: Topology, state_file: Path) -> list[str]:
    """One line per gateway of `topo` with ports no selecting Gateway server
    listens on; [] when every port is served, or when the policies do not load
    (the control plane names the bad file when it starts)."""
    spec = topo.spec
    if not topo.gateways or spec.istio_policies is None:
        return []
    try:
        mesh = istio.load(spec.istio_policies, mesh_file=state_file)
    except ValueError:
        return []
    out = []
    for pod in topo.gateways:
        served = gateway.listen_ports(mesh, Workload(pod.name, spec.namespace, pod.ip, dict(pod.labels)))
        missing = [p for p in pod.ports if served and p not in served]
        if missing:
            by = sorted({s.ref for srvs in served.values() for s in srvs})
            out.append(f"{spec.path}: gateways.{pod.service}.ports: {missing} "
                       f"{'is' if len(missing) == 1 else 'are'} no port of the Gateway servers that "
                       f"select it ({', '.join(by)} listen on {sorted(served)}): its Envoy would never "
                       "listen there")
    return out
