"""iptables rules and hosts files of a pod, as text (pure).

Called by `mesh.plumbing`, which feeds the text to `iptables-restore` inside
the pod's network namespace. The interception follows istio-iptables:
outbound TCP to 15001, inbound TCP to 15006, the sidecar's uid 1337 and
loopback excluded, Envoy admin reachable. `L7FP_SERVICES` plays kube-proxy:
a service VIP is DNATed to one of its pods (random among replicas), so apps
reach services by name also without a sidecar (`--sidecars none`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.spec import ENVOY_ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, SIDECAR_UID


@dataclass(frozen=True)
class ServiceAddr:
    """A service as seen by the pods: VIP, ports, pod addresses, DNS names."""

    name: str
    vip: str
    ports: tuple[int, ...]
    pod_ips: tuple[str, ...]
    names: tuple[str, ...]


def interception_rules(comment: str, exclude_inbound: Sequence[int] = ()) -> list[str]:
    """istio-iptables nat rules (without the table header and COMMIT)."""
    c = f'-m comment --comment "{comment}"'
    rules = [
        ":ISTIO_INBOUND - [0:0]",
        ":ISTIO_IN_REDIRECT - [0:0]",
        ":ISTIO_OUTPUT - [0:0]",
        ":ISTIO_REDIRECT - [0:0]",
        f"-A PREROUTING -p tcp {c} -j ISTIO_INBOUND",
        f"-A OUTPUT -p tcp {c} -j ISTIO_OUTPUT",
        f"-A ISTIO_INBOUND -p tcp --dport 22 {c} -j RETURN",
    ]
    for port in (ENVOY_ADMIN_PORT, *exclude_inbound):
        rules.append(f"-A ISTIO_INBOUND -p tcp --dport {port} {c} -j RETURN")
    rules += [
        f"-A ISTIO_INBOUND -p tcp {c} -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_IN_REDIRECT -p tcp {c} -j REDIRECT --to-ports {INBOUND_PORT}",
        # Envoy's inbound passthrough source address: never redirect again.
        f"-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo {c} -j RETURN",
        # The sidecar talking to its own pod address over lo: that is inbound.
        f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner {SIDECAR_UID} {c}"
        " -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {SIDECAR_UID} {c} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --uid-owner {SIDECAR_UID} {c} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --gid-owner {SIDECAR_UID} {c} -j RETURN",
        f"-A ISTIO_OUTPUT -d 127.0.0.1/32 {c} -j RETURN",
        f"-A ISTIO_OUTPUT {c} -j ISTIO_REDIRECT",
        f"-A ISTIO_REDIRECT -p tcp {c} -j REDIRECT --to-ports {OUTBOUND_PORT}",
    ]
    return rules


def service_rules(comment: str, services: Sequence[ServiceAddr]) -> list[str]:
    """kube-proxy-like DNAT of VIP:port to a pod, random among replicas."""
    c = f'-m comment --comment "{comment}"'
    rules = [":L7FP_SERVICES - [0:0]", f"-A OUTPUT -p tcp {c} -j L7FP_SERVICES"]
    for svc in services:
        for port in svc.ports:
            n = len(svc.pod_ips)
            for i, ip in enumerate(svc.pod_ips):
                remaining = n - i
                prob = "" if remaining == 1 else (
                    f"-m statistic --mode random --probability {1 / remaining:.5f} ")
                rules.append(f"-A L7FP_SERVICES -d {svc.vip}/32 -p tcp --dport {port} {prob}{c}"
                             f" -j DNAT --to-destination {ip}:{port}")
    return rules


def pod_nat_table(comment: str, services: Sequence[ServiceAddr], sidecar: bool) -> str:
    """The whole `iptables-restore` input for a pod's nat table."""
    lines = ["*nat"]
    rules = interception_rules(comment) if sidecar else []
    svc = service_rules(comment, services)
    # Chain declarations first, then rules: interception before DNAT, so the
    # sidecar sees the VIP as the original destination (as with kube-proxy,
    # which acts outside the pod after Envoy).
    lines += [r for r in rules + svc if r.startswith(":")]
    lines += [r for r in rules + svc if not r.startswith(":")]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def hosts_file(services: Sequence[ServiceAddr], pod: str, pod_ip: str) -> str:
    """/etc/netns/<ns>/hosts: service names to VIPs, as cluster DNS would."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{pod_ip}\t{pod}"]
    lines += [f"{s.vip}\t{' '.join(s.names)}" for s in services]
    return "\n".join(lines) + "\n"
