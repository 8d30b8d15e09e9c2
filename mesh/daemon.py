"""The mesh daemon: builds a mesh, supervises it, applies policy changes.

Started by `mesh.runner.Mesh.up()` as `python -m mesh.daemon FILE --name N ...`
in its own session. It is the parent of every app, sidecar and control plane
of the mesh (an Envoy whose parent exits gets SIGTERM), reports one line on
stdout (`READY <state file>` or `ERROR <message>`) and then logs to
<state dir>/daemon.log. SIGTERM/SIGINT make it stop its processes and tear the
mesh down. It polls the mesh and policy files and regenerates the pods' Envoy
resources on a change (in force within about 200 ms).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from mesh import (
    claim,
    configdir,
    envoyconf,
    gateway_ports,
    namelock,
    naming,
    netrules,
    plumbing,
    spec,
    teardown,
    topology,
)
from mesh.supervisor import Proc, Supervisor, pod_argv
from xds_server.ports import pick_free_port

log = logging.getLogger("mesh.daemon")
POLL_S = 0.1


class Daemon:
    """One running mesh; all state the daemon holds lives here."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.spec = spec.load(args.file, args.name)
        self.name = self.spec.name
        self.dir = teardown.state_dir(self.name)
        self.sup = Supervisor()
        self.sidecars = args.sidecars == "envoy"
        self.xds_mode = args.xds
        self.cgroups: dict[str, str] = {}
        self.xds_addr: tuple[str, int] | None = None
        self.cp_admin: str | None = None
        self.topo: topology.Topology | None = None
        self.stamps: dict[Path, tuple[int, int]] = {}
        self.stop = False
        self.policy_error = ""  # the last edit refused (shown by `mesh status`), "" once one applies
        self.ready = False  # state.json says so: `mesh status` of a starting mesh is no dead one
        self.sole_holder = False  # holds the name's lock alone (see release_name)
        self.gateways_not_ready: dict[str, str] = {}  # gateway pod -> why not ready (state.json)

    # -- build -------------------------------------------------------------
    def build(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        with plumbing.host_lock():  # two meshes starting at once must not share a /24
            subnet = naming.pick_subnet(self.name, plumbing.taken_octets())
            plumbing.create_bridge(self.name, subnet)
        self.topo = topo = topology.build(self.spec, subnet)
        comment = naming.iptables_comment(self.name)
        for pod in topo.all_pods():
            hosts = netrules.hosts_file(topo.services, pod.name, pod.ip)
            plumbing.create_pod_netns(self.name, pod.name, pod.index, pod.ip, subnet, hosts)
            # a gateway is the edge: nothing to intercept in its netns
            plumbing.load_pod_nat(pod.netns, netrules.pod_nat_table(
                comment, topo.services, self.sidecars and not pod.gateway))
            if pod.gateway:  # its Envoy (uid 1337) may bind ports below 1024, as Istio's does
                plumbing.allow_low_ports(pod.netns)
            self.cgroups[pod.name] = str(plumbing.create_cgroup(self.name, pod.name))
        self.gateways_not_ready = {g.name: "starting" for g in topo.gateways}
        self.write_state()  # early: `l7fp serve --mesh-file` and the fast path read it
        unserved = gateway_ports.unserved_ports(topo, self.dir / "state.json")
        if unserved:  # now, not at --timeout: those ports would never open
            raise spec.MeshFileError("; ".join(unserved))
        if self.sidecars:
            files = self.write_config()
            if self.xds_mode == "file":
                plumbing.ensure_inotify_instances(max(1024, 4 * files))
            if self.xds_mode == "ads":
                self.start_control_plane()
        self.start_apps()
        if self.sidecars:
            self.start_sidecars()
        self.wait_ready(self.args.timeout)
        self.ready = True
        self.write_state()
        self.stamps = self.file_stamps()

    def delivery(self, pod: str) -> envoyconf.Delivery:
        if self.xds_mode == "ads":
            return envoyconf.Delivery("ads")
        return envoyconf.Delivery("file", str(self.dir / "xds-files" / pod))

    def write_config(self) -> int:
        """(Re)generate every pod's resources; return how many files changed."""
        assert self.topo is not None
        services = list(self.topo.services)
        if self.xds_mode == "ads" and self.spec.istio_policies is not None:
            (self.dir / "xds").mkdir(exist_ok=True)  # `l7fp serve --policies` generates it all
            return 0
        if self.xds_mode == "ads":
            d, ns = self.dir / "xds", self.spec.namespace
            shared = envoyconf.shared_resources(self.spec, services, self.delivery(""))
            changed = int(configdir.write_ads_file(d, "mesh", {"id": "sidecar~*"}, shared))
            for svc in self.spec.groups():
                own = envoyconf.service_resources(self.spec, svc, self.delivery(""))
                changed += configdir.write_ads_file(d, f"svc-{svc}", {"cluster": f"{svc}.{ns}"}, own)
            return changed
        changed = 0
        for pod in self.topo.pods:
            res = envoyconf.pod_resources(self.spec, pod.info(), services, self.delivery(pod.name))
            changed += configdir.write_file_xds(self.dir / "xds-files" / pod.name, res)
        return changed

    def start_control_plane(self, attempts: int = 3) -> None:
        """`l7fp serve` as a supervised child; new ports if another process took
        the free ones between our probe and its bind (a shared machine)."""
        assert self.topo is not None
        from mesh.controlplane import serve_argv
        cg = plumbing.create_cgroup(self.name, "_control-plane")
        for attempt in range(1, attempts + 1):
            port = pick_free_port(self.topo.subnet.gateway)
            admin_port = pick_free_port("127.0.0.1")
            self.xds_addr = (self.topo.subnet.gateway, port)
            self.cp_admin = f"127.0.0.1:{admin_port}"
            argv = serve_argv(self.dir / "xds", self.xds_addr, ("127.0.0.1", admin_port),
                              self.args.fastpath, self.spec, self.dir / "state.json")
            proc = self.sup.add(Proc("control-plane", pod_argv(argv, None),
                                     self.dir / "logs" / "control-plane.log", cg))
            try:
                # the mesh's own timeout, not a fixed 20 s: under load `l7fp serve`'s
                # imports alone took longer (seen twice at load 10); a crash still ends it at once
                _wait_port(self.xds_addr, self.args.timeout, proc)
                return
            except RuntimeError:
                if attempt == attempts or "address already in use" not in \
                        proc.log_path.read_text(errors="replace")[-2000:]:
                    raise
                log.warning("control plane could not bind (port taken meanwhile); retrying")
                proc.stop()

    def start_apps(self) -> None:
        assert self.topo is not None
        for pod in self.topo.pods:
            svc = self.spec.services[pod.deployment]
            if svc.app == "direct_response":
                boot = self.dir / "bootstrap" / f"{pod.name}-app.yaml"
                configdir.write_bootstrap(boot, envoyconf.direct_response_bootstrap(svc.name, svc.ports))
                cmd = [self.args.envoy, "-c", str(boot), "--concurrency", "1",
                       "--disable-hot-restart", "--log-level", "warning"]
            else:
                cmd = [expand(a, self.args.envoy) for a in svc.command]
            env = {**os.environ, **svc.env, "POD_NAME": pod.name, "POD_IP": pod.ip,
                   "SERVICE_NAME": svc.name, "MESH_NAMESPACE": self.spec.namespace}
            uid = None if svc.user == "root" else int(svc.user)
            self.sup.add(Proc(f"{pod.name}/app", pod_argv(cmd, pod.netns, uid),
                              self.dir / "logs" / f"{pod.name}.app.log",
                              Path(self.cgroups[pod.name]), env))

    def start_sidecars(self) -> None:
        """Every pod's Envoy: a sidecar, or a gateway's (its node id says router)."""
        assert self.topo is not None
        for pod in self.topo.all_pods():
            boot_doc = envoyconf.sidecar_bootstrap(pod.info(), f"{pod.service}.{self.spec.namespace}",
                                                   self.delivery(pod.name), self.xds_addr)
            boot = self.dir / "bootstrap" / f"{pod.name}-sidecar.yaml"
            configdir.write_bootstrap(boot, boot_doc)
            cmd = [self.args.envoy, "-c", str(boot), "--concurrency", "1", "--disable-hot-restart",
                   "--drain-time-s", "1", "--log-level", "warning"]
            self.sup.add(Proc(f"{pod.name}/envoy", pod_argv(cmd, pod.netns, spec.SIDECAR_UID),
                              self.dir / "logs" / f"{pod.name}.envoy.log", Path(self.cgroups[pod.name])))

    def wait_ready(self, timeout: float) -> None:
        """Every app listens on its ports; every sidecar's admin says LIVE; every
        gateway's Envoy listens on its ports (its listeners came from the control
        plane), or the control plane said no Gateway selects it (state.json keeps why)."""
        assert self.topo is not None
        deadline = time.monotonic() + timeout
        waiting = {p.name for p in self.topo.all_pods()}
        while waiting:
            for pod in self.topo.all_pods():
                if pod.name in waiting and self.pod_ready(pod):
                    waiting.discard(pod.name)
                    self.gateways_not_ready.pop(pod.name, None)
                elif pod.name in waiting and pod.gateway and self.unselected(pod):
                    waiting.discard(pod.name)
                    self.gateways_not_ready[pod.name] = (
                        f"no Gateway selects its labels {dict(pod.labels)} (control plane log)")
            dead = [p.name for p in self.sup.procs.values() if p.popen and p.popen.poll() is not None]
            if dead:
                first = self.sup.procs[dead[0]]
                tail = first.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"exited during start: {', '.join(dead)}; {dead[0]} log: "
                                   + " | ".join(tail))
            if self.stop:  # SIGTERM/SIGINT (an interrupted `mesh up`): no use waiting on
                raise RuntimeError(f"stopped while starting; not ready: {sorted(waiting)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {sorted(waiting)}"
                                   f"{self.gateway_ports_said(waiting)} (logs in {self.dir}/logs)")
            time.sleep(0.2)

    def pod_ready(self, pod: topology.Pod) -> bool:
        # what listens on the pod's ports: its app, or a gateway's Envoy
        listener = self.sup.procs[f"{pod.name}/{'envoy' if pod.gateway else 'app'}"]
        if listener.pid is None or not set(pod.ports) <= listening_ports(listener.pid):
            return False
        if not self.sidecars:
            return True
        try:
            with urllib.request.urlopen(f"http://{pod.ip}:{spec.ENVOY_ADMIN_PORT}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def unselected(self, pod: topology.Pod) -> bool:
        """Whether the control plane logged that no Gateway selects gateway `pod`
        (xds_server.istio.gateway.generate_router: its Envoy gets no listener)."""
        cp = self.sup.procs.get("control-plane")
        if cp is None:
            return False
        try:
            lines = cp.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return False
        said = f"router {pod.name}.{self.spec.namespace} (labels "
        return any(said in line and "no Gateway selects it" in line for line in lines)

    def gateway_ports_said(self, waiting: set[str]) -> str:
        """For a start that timed out: the ports each waited-for gateway's Envoy
        does listen on (a Gateway server port that is not in its `ports:`)."""
        assert self.topo is not None
        said = []
        for gw in self.topo.gateways:
            proc = self.sup.procs.get(f"{gw.name}/envoy")
            if gw.name in waiting and proc is not None and proc.pid is not None:
                have = sorted(listening_ports(proc.pid) - {spec.ENVOY_ADMIN_PORT})
                said.append(f"gateway {gw.name} listens on {have}, its ports are {list(gw.ports)}")
        return f" ({'; '.join(said)})" if said else ""

    def write_state(self) -> None:
        assert self.topo is not None
        pids: dict[str, dict[str, int]] = {}
        for name, proc in self.sup.procs.items():
            if "/" in name and proc.pid:
                pod, role = name.split("/")
                pids.setdefault(pod, {})[role] = proc.pid
        cp = self.sup.procs.get("control-plane")
        doc = topology.state_doc(
            self.topo, pid=os.getpid(), cgroups=self.cgroups, pids=pids,
            xds=f"{self.xds_addr[0]}:{self.xds_addr[1]}" if self.xds_addr else None,
            admin=self.cp_admin, config_dir=str(self.dir / ("xds" if self.xds_mode == "ads" else "xds-files")),
            extra={"sidecars": "envoy" if self.sidecars else "none", "xds_mode": self.xds_mode,
                   "fastpath": self.args.fastpath, "logs": str(self.dir / "logs"),
                   "control_plane_pid": cp.pid if cp else None,
                   "policy_files": [str(p) for p in self.spec.policy_files],
                   "policy_error": self.policy_error, "ready": self.ready},
            gateways_not_ready=self.gateways_not_ready)
        configdir.atomic_write(self.dir / "state.json", json.dumps(doc, indent=1) + "\n")

    # -- run ---------------------------------------------------------------
    def file_stamps(self) -> dict[Path, tuple[int, int]]:
        out = {}
        for p in (self.spec.path, *self.spec.policy_files):
            try:
                st = p.stat()
                out[p] = (st.st_mtime_ns, st.st_size)
            except OSError:
                out[p] = (0, 0)
        return out

    def reload(self) -> None:
        """Apply a changed policy; topology changes need `down` + `up`."""
        try:
            new = spec.load(self.spec.path, self.name)
        except spec.MeshFileError as exc:
            log.error("policy not applied, previous policy stays: %s", exc)
            return self._policy_refused(str(exc))
        if new.services != self.spec.services or new.namespace != self.spec.namespace or \
                new.gateways != self.spec.gateways:
            log.error("services or gateways changed in %s: only policy is applied live; "
                      "run `l7fp mesh down` and `up` for topology changes", new.path)
            return self._policy_refused(f"services or gateways changed in {new.path}: only policy is "
                                        "applied live (`mesh down` + `up` for the rest)")
        self.spec = new
        if self.policy_error:
            self._policy_refused("")
        if self.sidecars:
            log.info("policy change applied: %d file(s) rewritten", self.write_config())

    def _policy_refused(self, why: str) -> None:
        """Record (or clear, with "") the refused edit in state.json for `mesh status`;
        else it was only in daemon.log and the user saw the old policy serve, unsaid."""
        self.policy_error = " ".join(why.split())[:400]  # YAML errors span lines: one line
        self.write_state()

    def run(self) -> None:
        seen = self.stamps
        while not self.stop:
            time.sleep(POLL_S)
            events = self.sup.check()
            for line in events:
                log.warning("%s", line)
            if events:
                self.write_state()  # new pids of restarted processes
            # A change is applied once the files stood still for a poll: a file
            # read between a writer's truncate and its write (`echo >`, editors
            # that write in place) is an empty policy, and applying it drops
            # every pod's policy (a deny, a rate limit) until the next poll.
            stamps = self.file_stamps()
            if stamps != self.stamps and stamps == seen:
                self.stamps = stamps
                self.reload()
            seen = stamps

    def shutdown(self) -> None:
        self.sup.stop_all()
        for line in teardown.down(self.name, stop_running_daemon=False):
            log.info("removed %s", line)


def expand(arg: str, envoy: str) -> str:
    """`${PYTHON}` is this interpreter (the venv's), `${ENVOY}` the Envoy binary."""
    return arg.replace("${PYTHON}", sys.executable).replace("${ENVOY}", envoy)


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of `pid`."""
    ports = set()
    for f in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{f}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def last_error(log_path: Path) -> str:
    """The last ERROR of a process log without its time and logger (`l7fp serve`'s
    reason to exit, e.g. the policy field Envoy's schema refuses), else its last line."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {log_path}"
    errors = [ln.split(" ERROR ", 1)[1] for ln in lines if " ERROR " in ln]
    last = errors[-1].split(": ", 1)[-1] if errors else (lines[-1] if lines else "(empty log)")
    return last.strip()


def _wait_port(addr: tuple[str, int], timeout: float, proc: Proc) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():  # its log goes with the teardown: say its last error here
            raise RuntimeError(f"control plane exited: {last_error(proc.log_path)}")
        try:
            socket.create_connection(addr, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"control plane not listening on {addr[0]}:{addr[1]} after {timeout:.0f}s "
                       "(the mesh's --timeout)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mesh.daemon")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--sidecars", choices=["envoy", "none"], default="envoy")
    p.add_argument("--xds", choices=["ads", "file"], default="ads")
    p.add_argument("--fastpath", choices=["on", "off", "auto"], default="off")
    p.add_argument("--envoy", default=shutil.which("envoy") or "envoy")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--lock-fd", type=int, help="the mesh name's lock, held by `Mesh.up` "
                   "(mesh.claim); without it the daemon takes the lock itself")
    return p.parse_args(argv)


def hold_name(name: str, lock_fd: int | None) -> int | None:
    """The fd of mesh `name`'s lock, held for the daemon's life (mesh.claim): the
    one `Mesh.up` handed down, else taken here; None when another process holds it.
    Not inherited by the mesh's processes: it must go when the daemon goes."""
    fd = lock_fd if lock_fd is not None else namelock.try_lock(name)
    if fd is not None:
        os.set_inheritable(fd, False)
        namelock.record_holder(fd)  # `mesh down` finds the daemon before state.json exists
    return fd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    try:
        d = Daemon(args)
    except spec.MeshFileError as exc:
        print(f"ERROR {exc}", file=out, flush=True)
        return 2
    lock = hold_name(d.name, args.lock_fd)
    if lock is None:
        print(f"ERROR mesh {d.name!r} {claim.busy_what(d.name)}", file=out, flush=True)
        return 2
    d.sole_holder = args.lock_fd is None
    try:
        return build_and_run(d, out)
    finally:  # the mesh is gone (a SIGKILL skips this: the next `up` or `down` cleans)
        release_name(d, lock)


def release_name(d: Daemon, lock: int) -> None:
    """Let go of the name's lock as the daemon exits. Only its sole holder removes
    the file: before READY `Mesh.up` still holds its copy and tears the failed
    start down under it, then drops the file itself; removing it here let a third
    `mesh up` lock a new file and claim the name in that gap (then torn down)."""
    if d.sole_holder:
        namelock.drop(d.name, lock)
    else:
        os.close(lock)


def build_and_run(d: Daemon, out: Any) -> int:
    """Build the mesh, say READY (or ERROR) on `out`, supervise it until told to
    stop, tear it down; the exit status of the daemon."""
    d.dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=d.dir / "daemon.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_signal(_sig: int, _frm: Any) -> None:
        d.stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        d.build()
    except Exception as exc:  # anything: report it, leave nothing half started
        log.exception("mesh %s failed to start", d.name)
        kept = Path(f"/tmp/l7fp-mesh-{d.name}-failed")
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(d.dir, kept, ignore=shutil.ignore_patterns("xds*"), dirs_exist_ok=True)
        d.shutdown()
        why = str(exc).replace(f" (logs in {d.dir}/logs)", "")  # removed by shutdown: name the copy
        print(f"ERROR {why} (logs kept in {kept})", file=out, flush=True)
        return 1
    try:
        print(f"READY {d.dir / 'state.json'}", file=out, flush=True)
    except BrokenPipeError:  # `mesh up` was killed while we started: nobody owns this mesh
        log.warning("mesh %s: `l7fp mesh up` went away before READY; tearing down", d.name)
        d.sole_holder = True  # its copy of the lock went with it
        d.shutdown()
        return 1
    d.sole_holder = True  # `Mesh.up` closes its copy once it reads READY
    # Let go of the caller's pipe (its reader waits for EOF); late output to the log.
    logfd = os.open(d.dir / "daemon.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    try:
        d.run()
    finally:
        log.info("stopping mesh %s", d.name)
        d.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
