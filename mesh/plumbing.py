"""Host plumbing of a mesh: bridge, pod namespaces, veths, iptables, cgroups.

Called by `mesh.runner` to build pods and by `mesh.teardown` to remove them.
Owns no state: every object is named by `mesh.naming`, so teardown can find it
again after a crash. Uses the real `ip` and `iptables` tools (root needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from mesh import naming

log = logging.getLogger(__name__)


class PlumbingError(RuntimeError):
    """A host command failed; the message holds the command and its stderr."""


def sh(*args: str, check: bool = True, stdin: str | None = None) -> str:
    """Run a command; raise PlumbingError naming it when it fails."""
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise PlumbingError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Serialize subnet choice between mesh daemons on this host (flock)."""
    root = Path(naming.STATE_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "mesh.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cgroup2_root() -> Path:
    """Mount point of cgroup v2, read from /proc/mounts (never hard-coded)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise PlumbingError("no cgroup v2 mount in /proc/mounts")


def mesh_cgroup(mesh: str) -> Path:
    return cgroup2_root() / "l7fp" / mesh


def taken_octets() -> set[int]:
    return naming.octets_in_use(sh("ip", "-4", "route", "show").splitlines())


def create_bridge(mesh: str, subnet: naming.Subnet) -> str:
    br = naming.bridge_name(mesh)
    sh("ip", "link", "add", br, "type", "bridge")
    sh("ip", "link", "set", br, "alias", naming.link_alias(mesh, "_bridge"))
    sh("ip", "addr", "add", f"{subnet.gateway}/24", "dev", br)
    sh("ip", "link", "set", br, "up")
    # A host whose FORWARD policy is DROP (Docker) would drop bridged pod
    # traffic (br_netfilter): accept ours explicitly, tagged for teardown.
    for direction in ("-i", "-o"):
        sh("iptables", "-w", "-I", "FORWARD", direction, br, "-m", "comment",
           "--comment", naming.iptables_comment(mesh), "-j", "ACCEPT")
    return br


def create_pod_netns(mesh: str, pod: str, index: int, ip: str, subnet: naming.Subnet,
                     hosts: str) -> str:
    """Namespace with eth0 on the mesh bridge, lo up, default route, hosts file."""
    ns = naming.netns_name(mesh, pod)
    etc = Path("/etc/netns") / ns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(hosts)
    # Owner marker, read by teardown (not in /etc/netns: `ip netns exec` would
    # try to bind-mount every file there onto /etc).
    marker = owner_marker(ns)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(mesh + "\n")
    sh("ip", "netns", "add", ns)
    host_if, pod_if = naming.veth_names(mesh, index)
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
    sh("ip", "link", "set", host_if, "alias", naming.link_alias(mesh, pod))
    sh("ip", "link", "set", host_if, "master", naming.bridge_name(mesh))
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "link", "set", pod_if, "netns", ns)
    nse = ("ip", "netns", "exec", ns)
    sh(*nse, "ip", "link", "set", pod_if, "name", "eth0")
    sh(*nse, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    sh(*nse, "ip", "link", "set", "eth0", "up")
    sh(*nse, "ip", "link", "set", "lo", "up")
    sh(*nse, "ip", "route", "add", "default", "via", subnet.gateway)
    return ns


def allow_low_ports(ns: str) -> None:
    """Let any uid bind ports below 1024 in netns `ns` (a gateway's Envoy runs as
    uid 1337; Istio's gateway pods set the same sysctl)."""
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0")


def ensure_inotify_instances(needed: int) -> None:
    """Envoy's file xDS opens one inotify instance per watched file, all under
    uid 1337; the default limit (128 per uid) is too low for a dozen sidecars."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    current = int(path.read_text())
    if current < needed:
        path.write_text(f"{needed}\n")
        log.info("raised fs.inotify.max_user_instances %d -> %d", current, needed)


def owner_marker(ns: str) -> Path:
    return Path(naming.STATE_ROOT).parent / "netns-owner" / ns


def load_pod_nat(ns: str, table: str) -> None:
    sh("ip", "netns", "exec", ns, "iptables-restore", "-w", stdin=table)


def create_cgroup(mesh: str, pod: str) -> Path:
    path = mesh_cgroup(mesh) / pod
    path.mkdir(parents=True, exist_ok=True)
    return path


def join_cgroup(path: Path, pid: int | None = None) -> None:
    (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def netns_list() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def links_with_alias_prefix(prefix: str) -> list[str]:
    """Host links whose alias starts with `prefix` (`ip -o link` output)."""
    out = []
    for line in sh("ip", "-o", "link", "show").splitlines():
        if " alias " in line:
            alias = line.split(" alias ", 1)[1].split()[0]
            if alias.startswith(prefix):
                out.append(line.split(":", 2)[1].strip().split("@")[0])
    return out


def host_rules_with_comment(comment: str) -> list[tuple[str, list[str]]]:
    """(table, rule args after -A) of host iptables rules tagged `comment`."""
    out = []
    table = "filter"
    for line in sh("iptables-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and _has_comment(line, comment):
            out.append((table, shlex.split(line)[1:]))
    return out


def _has_comment(line: str, comment: str) -> bool:
    return f'--comment "{comment}"' in line or f"--comment {comment} " in line + " "


def delete_host_rule(table: str, spec: Sequence[str]) -> None:
    sh("iptables", "-w", "-t", table, "-D", *spec, check=False)
