"""Names and addresses of every object a mesh creates.

Pure functions, called by `mesh.runner` (to create), `mesh.teardown` (to find
objects again with no state file) and `mesh.envoyconf`. Every object carries
the mesh name: netns `l7fp-<mesh>-<pod>`, link alias `l7fp:<mesh>:<pod>`,
cgroup `<cgroup2>/l7fp/<mesh>/<pod>`, iptables comment `l7fp:<mesh>`.

Addresses: each mesh gets one /24 of pod addresses in 198.18.0.0/16 and the
matching /24 of service VIPs in 198.19.0.0/16, chosen from a hash of the mesh
name (then the next free one), so concurrent meshes never overlap.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

STATE_ROOT = "/run/l7fp/mesh"
NETNS_PREFIX = "l7fp-"


def lock_path(mesh: str) -> str:
    """The lock file of a mesh name (mesh.claim): beside its state directory, not in
    it, so a teardown that removes the directory never removes the lock."""
    return f"{STATE_ROOT}/{mesh}.lock"


def netns_name(mesh: str, pod: str) -> str:
    return f"{NETNS_PREFIX}{mesh}-{pod}"


def link_alias(mesh: str, pod: str) -> str:
    return f"l7fp:{mesh}:{pod}"


def iptables_comment(mesh: str) -> str:
    return f"l7fp:{mesh}"


def _h(mesh: str) -> str:
    return hashlib.sha1(mesh.encode()).hexdigest()[:6]


def bridge_name(mesh: str) -> str:
    """At most 15 characters (IFNAMSIZ); the alias carries the full mesh name."""
    return f"l7br{_h(mesh)}"


def veth_names(mesh: str, index: int) -> tuple[str, str]:
    """(host side, pod side) for pod number `index` of the mesh."""
    return f"l7v{_h(mesh)}h{index}", f"l7v{_h(mesh)}p{index}"


def node_id(ip: str, pod: str, namespace: str, kind: str = "sidecar") -> str:
    """Istio's node id: KIND~IP~POD.NS~NS.svc.cluster.local (KIND `sidecar`, or
    `router` for a gateway's Envoy)."""
    return f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


def fqdn(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def outbound_cluster(service: str, port: int, namespace: str) -> str:
    """Istio's cluster name for a service port: outbound|PORT||FQDN."""
    return f"outbound|{port}||{fqdn(service, namespace)}"


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


@dataclass(frozen=True)
class Subnet:
    """The third octet shared by a mesh's pod /24 and VIP /24."""

    octet: int

    @property
    def gateway(self) -> str:
        return f"198.18.{self.octet}.1"

    @property
    def cidr(self) -> str:
        return f"198.18.{self.octet}.0/24"

    def pod_ip(self, index: int) -> str:
        return f"198.18.{self.octet}.{index + 2}"

    def vip(self, index: int) -> str:
        return f"198.19.{self.octet}.{index + 2}"


def pick_subnet(mesh: str, taken: set[int]) -> Subnet:
    """First free octet at or after the mesh's hash; `taken` = octets in use."""
    start = int(_h(mesh), 16) % 254 + 1
    for k in range(254):
        octet = (start + k - 1) % 254 + 1
        if octet not in taken:
            return Subnet(octet)
    raise RuntimeError("no free /24 left in 198.18.0.0/16 for another mesh")


def octets_in_use(route_lines: list[str]) -> set[int]:
    """Octets of 198.18.X.0/24 routes already on the host (`ip -4 route` lines)."""
    used = set()
    for line in route_lines:
        first = line.split(" ", 1)[0]
        try:
            net = ipaddress.IPv4Network(first, strict=False)
        except ValueError:
            continue
        if net.subnet_of(ipaddress.IPv4Network("198.18.0.0/16")) and net.prefixlen >= 16:
            used.add(int(str(net.network_address).split(".")[2]))
    return used
