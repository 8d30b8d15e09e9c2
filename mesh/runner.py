"""Python API of the local mesh: `Mesh(file).up()`, `.exec()`, `.status()`, `.down()`.

Called by the `l7fp mesh` CLI, `l7fp demo`, the benchmark harness and tests.
`up()` validates the mesh file (nothing starts when it is bad), then starts
the mesh daemon (`mesh.daemon`, its own session) which builds and supervises
the mesh and stays running after `up()` returns; `down()` stops it and removes
everything by the mesh's name, also after a crash. The running mesh is
described by /run/l7fp/mesh/<name>/state.json (docs/contracts.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mesh import claim, namelock, naming, teardown
from mesh import spec as mspec
from mesh.errors import MeshBusy as MeshBusy  # re-exported: callers catch it from here
from mesh.errors import MeshError
from mesh.supervisor import pid_alive
from xds_server.envoyproc import envoy_path

log = logging.getLogger(__name__)


def default_envoy() -> str:
    """The venv's Envoy, else one on PATH, else plain "envoy" (the mesh's preflight names it)."""
    try:
        return envoy_path()
    except FileNotFoundError:
        return "envoy"


def preflight() -> None:
    if os.geteuid() != 0:
        raise MeshError("the local mesh needs root (network namespaces, iptables, cgroups)")
    for tool in ("ip", "iptables", "iptables-restore", "iptables-save", "setpriv"):
        if shutil.which(tool) is None:
            raise MeshError(f"`{tool}` not found: run scripts/setup-host.sh")


class Mesh:
    """A mesh described by a mesh file. `name` overrides the file's `name:`.

    sidecars: "envoy" (default) or "none" (pods and apps only: a no-mesh baseline).
    xds: "ads" (default) or "file" (Envoy's own filesystem xDS, no control plane); with "ads"
    (`l7fp serve` as a supervised child, the pods' resources in its config dir).
    fastpath: passed to `l7fp serve --fastpath` (ads only).
    """

    def __init__(self, file: str | Path, name: str | None = None, *, sidecars: str = "envoy",
                 xds: str = "ads", fastpath: str = "off", envoy: str | None = None,
                 timeout: float = 90.0) -> None:
        self.spec = mspec.load(file, name)  # raises MeshFileError before anything starts
        if fastpath == "on" and xds == "file":  # `status` said "fastpath on" with no agent at all
            raise MeshError("--fastpath on needs --xds ads: the fast path runs in the control "
                            "plane, which --xds file does not start")
        if self.spec.gateways and (sidecars != "envoy" or xds != "ads"):
            raise MeshError(f"{self.spec.path}: gateways need --sidecars envoy and --xds ads: a "
                            "gateway's Envoy gets its listeners from the control plane")
        self.name = self.spec.name
        self.sidecars, self.xds, self.fastpath = sidecars, xds, fastpath
        self.envoy = envoy or default_envoy()
        self.timeout = timeout

    @property
    def state_file(self) -> Path:
        return teardown.state_dir(self.name) / "state.json"

    def up(self, say: Callable[[str], None] | None = None,
           claimed: Callable[[], None] | None = None) -> dict[str, Any]:
        """Start the mesh; return its state. Raises MeshError (nothing left behind),
        MeshBusy when a live process runs or starts a mesh of this name (nothing of
        it touched). What a crashed run of the name left is removed first and said
        in one line to `say` (default: the log). The rule is mesh.claim's.
        `claimed` is called once the name is this start's (`l7fp demo` says
        "starting" then, not before a refusal)."""
        preflight()
        lock, removed = claim.claim(self.name)
        proc = None
        try:
            if claimed:
                claimed()
            if removed:
                (say or log.warning)(claim.leftovers_line(self.name, removed))
            proc = self._spawn(lock)
            state = self._wait_ready(proc)
        except BaseException:
            if proc is None or proc.poll() is not None:  # no daemon holds the lock: nothing
                namelock.drop(self.name, lock)          # of the mesh is left, its lock goes too
                raise
            os.close(lock)
            raise
        os.close(lock)  # the daemon holds its inherited copy while it runs
        return state

    def _spawn(self, lock: int) -> subprocess.Popen:
        """The mesh daemon, handed the name's lock (`--lock-fd`, the same lock)."""
        argv = [sys.executable, "-m", "mesh.daemon", str(self.spec.path), "--name", self.name,
                "--sidecars", self.sidecars, "--xds", self.xds, "--fastpath", self.fastpath,
                "--envoy", self.envoy, "--timeout", str(self.timeout), "--lock-fd", str(lock)]
        env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                env=env, pass_fds=(lock,))

    def _wait_ready(self, proc: subprocess.Popen) -> dict[str, Any]:
        """The daemon's READY line, then the state; a failed start is removed."""
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline().strip()
        except BaseException:  # Ctrl-C (or SIGTERM, see mesh.cli) while starting: cancel it all
            _cancel(proc, self.name)
            raise
        if not line.startswith("READY"):
            rest = proc.stdout.read().strip().splitlines()  # a traceback, if it crashed
            proc.wait(30)
            teardown.down(self.name)
            if not line.startswith("ERROR") and rest:
                line = f"{line} ... {rest[-1]}"
            raise MeshError(line.removeprefix("ERROR ") or f"mesh daemon exited {proc.returncode}")
        proc.stdout.close()
        return self.state()

    def state(self) -> dict[str, Any]:
        st = teardown.read_state(self.name)
        if st is None:
            raise MeshError(f"mesh {self.name!r} is not running (no {self.state_file})")
        return st

    def down(self) -> list[str]:
        return teardown.down(self.name)

    def exec(self, target: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run `argv` in the pod `target` (a pod name, or a service: its first pod)."""
        return run_in_pod(self.state(), target, argv, **kw)

    def pod(self, target: str) -> dict[str, Any]:
        return find_pod(self.state(), target)


def _cancel(proc: subprocess.Popen, name: str) -> None:
    """Stop a mesh daemon that is still starting and remove what it made, so an
    interrupted `l7fp mesh up` leaves no half-started mesh behind."""
    proc.terminate()  # the daemon finishes its current step, then tears down
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    teardown.down(name)


def repo_pythonpath() -> str:
    """PYTHONPATH for a child that must import this tree's packages (the mesh
    daemon, the audit's pod client): the repository first, then the caller's."""
    repo = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return f"{repo}:{old}" if old else repo


def find_pod(state: dict[str, Any], target: str) -> dict[str, Any]:
    """A pod of the mesh state by name, else a service's (or gateway's) first pod."""
    pods = state["pods"] + state.get("gateways", [])
    for p in pods:
        if p["name"] == target:
            return dict(p)
    for p in pods:
        if p["service"] == target:
            return dict(p)
    names = sorted({p["service"] for p in pods})
    raise MeshError(f"no pod or service {target!r} in mesh {state['name']!r}; services: {names}")


def pod_popen(pod: dict[str, Any], argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start `argv` in `pod`'s netns and cgroup (a pod of the mesh state, as
    `find_pod` gives it), so its traffic is intercepted like the app's.
    `popen_kwargs` go to subprocess.Popen; the caller owns the process (waits
    for it, stops it). Callers: `run_in_pod`, mesh.demo, mesh.audit_pod."""
    cgroup = Path(pod["cgroup"])

    def join() -> None:  # in the child, before exec: its whole tree stays in the pod's cgroup
        (cgroup / "cgroup.procs").write_text("0\n")
    return subprocess.Popen(["ip", "netns", "exec", pod["netns"], *argv], preexec_fn=join,
                            **popen_kwargs)


def run_in_pod(state: dict[str, Any], target: str, argv: Sequence[str], *, input: Any = None,
               timeout: float | None = None, capture_output: bool = False, check: bool = False,
               **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run in the pod `target` (`pod_popen`): the same keywords, and
    the same ValueError for `input` with `stdin`, `capture_output` with
    `stdout`/`stderr`; on a timeout the process is killed and TimeoutExpired raised."""
    if capture_output:
        if kw.get("stdout") is not None or kw.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        if kw.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        kw["stdin"] = subprocess.PIPE
    with pod_popen(find_pod(state, target), argv, **kw) as proc:
        try:
            out, err = proc.communicate(input, timeout)
        except BaseException:  # TimeoutExpired, Ctrl-C: as subprocess.run, not left running
            proc.kill()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def resolve_name(name: str | None) -> str:
    """The mesh to act on: `name`, else the only running one."""
    if name:
        return name
    running = teardown.running_meshes()
    if len(running) == 1:
        return running[0]
    if not running:
        raise MeshError(f"no mesh is running (no state directory under {naming.STATE_ROOT}); give --name")
    raise MeshError(f"several meshes run ({', '.join(running)}): give --name")


def sidecar_admin(pod: dict[str, Any], path: str, timeout: float = 5.0) -> str:
    """The text of `path` (with its query) from a pod's sidecar admin API; OSError
    when the sidecar does not answer."""
    url = f"http://{pod['ip']}:{pod['envoy_admin']}{path}"
    with urllib.request.urlopen(url.replace("|", "%7C"), timeout=timeout) as r:
        return str(r.read().decode())


def envoy_stats(state: dict[str, Any], target: str, prefix: str = "") -> dict[str, int]:
    """Counters and gauges of a pod's sidecar, from its admin /stats."""
    text = sidecar_admin(find_pod(state, target), f"/stats?filter={prefix}" if prefix else "/stats")
    out = {}
    for line in text.splitlines():
        key, _, val = line.rpartition(": ")
        if val.strip().isdigit():
            out[key] = int(val)
    return out


def status_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pod, then per gateway pod: pids alive, Envoy readiness."""
    rows = []
    for p in state["pods"] + state.get("gateways", []):
        alive = {role: pid_alive(pid) for role, pid in p.get("pids", {}).items()}
        ready = "-"
        if state.get("sidecars") == "envoy" and state.get("ready") is not False:  # not started yet
            try:
                ready = sidecar_admin(p, "/ready", timeout=1).strip()
            except OSError as exc:
                ready = f"down ({exc.__class__.__name__})"
        rows.append({"pod": p["name"], "ip": p["ip"], "netns": p["netns"], "alive": alive,
                     "sidecar": ready})
    return rows


def dumps_state(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=1)
