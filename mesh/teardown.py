"""Remove everything a mesh made, found by its name (no state file needed).

Called by `l7fp mesh down`, by `Mesh.down()`, by the daemon on exit and by a
failed `up`. Idempotent: each step acts only on what it finds. Order: stop the
daemon, kill every process in the mesh's cgroups and namespaces, delete the
namespaces and their /etc/netns dirs, links (by alias), host iptables rules (by
comment), cgroup dirs, the state directory, and the name's lock file unless a
live process holds it (mesh.namelock: the holder removes it itself).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from mesh import namelock, naming, plumbing
from mesh.supervisor import pid_alive

log = logging.getLogger(__name__)


def state_dir(mesh: str) -> Path:
    return Path(naming.STATE_ROOT) / mesh


def read_state(mesh: str) -> dict | None:
    try:
        return json.loads((state_dir(mesh) / "state.json").read_text())
    except (OSError, ValueError):
        return None


def is_daemon(pid: int, mesh: str) -> bool:
    """Whether `pid` is a live mesh daemon of `mesh` (by its command line, so a
    reused pid is not taken for one)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"mesh.daemon" in cmd and mesh.encode() in cmd


def daemon_pid(mesh: str) -> int | None:
    """The live daemon of `mesh`: the pid in state.json, else the lock holder's
    (a daemon that has not written state.json yet); None when neither is one."""
    state = read_state(mesh) or {}
    for pid in (int(state.get("pid") or 0), namelock.holder_pid(mesh) or 0):
        if pid and pid != os.getpid() and is_daemon(pid, mesh):
            return pid
    return None


def stop_daemon(mesh: str, timeout: float = 15.0) -> bool:
    """SIGTERM the mesh's daemon (it tears down itself), SIGKILL if it hangs."""
    pid = daemon_pid(mesh)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and is_daemon(pid, mesh) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid) and is_daemon(pid, mesh):
        os.kill(pid, signal.SIGKILL)
    _await_lock_release(mesh, 5.0)
    return True


def _await_lock_release(mesh: str, timeout: float) -> None:
    """Wait (bounded) until the stopped daemon's lock is gone: a daemon killed,
    or dead before its SIGTERM handler, releases it as its files close, a moment
    after its cmdline empties; `down`'s last try_lock would fail before that and
    leave the lock file. Still held at the bound: a new `mesh up` holds it."""
    deadline = time.monotonic() + timeout
    while namelock.is_held(mesh) and time.monotonic() < deadline:
        time.sleep(0.05)


def await_starter(mesh: str, timeout: float) -> int | None:
    """For `mesh down`: while a process holds the name's lock with no daemon of
    it running (a `mesh up` between its claim and its daemon's first step, ~1 s),
    wait up to `timeout` for that daemon, so `down` finds and stops it. The
    holder's pid when none came (the caller says the mesh is being started),
    else None (a daemon runs now, or nothing holds the name)."""
    deadline = time.monotonic() + timeout
    while namelock.is_held(mesh) and daemon_pid(mesh) is None:
        if time.monotonic() >= deadline:
            return namelock.holder_pid(mesh) or 0
        time.sleep(0.05)
    return None


def mesh_namespaces(mesh: str) -> list[str]:
    """Namespaces of `mesh`: named in its state file or marked as its own.

    No guessing by name pattern: another engineer's `l7fp-<x>-...` namespaces
    (benchmarks) are never touched.
    """
    state = read_state(mesh) or {}
    listed = {p.get("netns") for p in state.get("pods", []) + state.get("gateways", [])}
    prefix = naming.netns_name(mesh, "")
    out = []
    for ns in plumbing.netns_list():
        if not ns.startswith(prefix):
            continue
        try:
            owner = plumbing.owner_marker(ns).read_text().strip()
        except OSError:
            owner = ""
        if owner == mesh or ns in listed:
            out.append(ns)
    return out


def _kill_cgroups(root: Path) -> None:
    if not root.is_dir():
        return
    kill = root / "cgroup.kill"
    if kill.exists():
        kill.write_text("1\n")
    else:  # kernels before 5.14: signal each process
        for procs in root.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                _kill(int(pid))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(p.read_text().strip() for p in root.rglob("cgroup.procs")):
            return
        time.sleep(0.05)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rmdir_tree(root: Path) -> None:
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    root.rmdir()


def down(mesh: str, stop_running_daemon: bool = True) -> list[str]:
    """Remove all of `mesh`; return one line per object removed."""
    done = []
    if stop_running_daemon and stop_daemon(mesh):
        done.append(f"stopped mesh daemon of {mesh}")
    try:
        cg = plumbing.mesh_cgroup(mesh)
    except plumbing.PlumbingError:
        cg = None
    if cg is not None and cg.is_dir():
        _kill_cgroups(cg)
    for ns in mesh_namespaces(mesh):
        for pid in plumbing.sh("ip", "netns", "pids", ns, check=False).split():
            _kill(int(pid))
        plumbing.sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        plumbing.owner_marker(ns).unlink(missing_ok=True)
        done.append(f"netns {ns}")
    for link in plumbing.links_with_alias_prefix(naming.link_alias(mesh, "")):
        plumbing.sh("ip", "link", "del", link, check=False)
        done.append(f"link {link}")
    for table, spec in plumbing.host_rules_with_comment(naming.iptables_comment(mesh)):
        plumbing.delete_host_rule(table, spec)
        done.append(f"iptables -t {table} {' '.join(spec)}")
    if cg is not None and cg.is_dir():
        _rmdir_tree(cg)
        done.append(f"cgroup {cg}")
        parent = cg.parent
        if parent.is_dir() and not any(p.is_dir() for p in parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:
                pass  # another mesh created one meanwhile
    sd = state_dir(mesh)
    if sd.exists():
        shutil.rmtree(sd, ignore_errors=True)
        done.append(f"state {sd}")
    lock = namelock.try_lock(mesh)  # None: a start or the daemon holds it, and drops it itself
    if lock is not None:
        namelock.drop(mesh, lock)
    return done


def running_meshes() -> list[str]:
    root = Path(naming.STATE_ROOT)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
