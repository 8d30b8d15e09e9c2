"""The harness's own pods: network namespaces on a private bridge, one cgroup per pod.

Owned by the benchmark harness; `benchmarks.configs` builds one `BenchNet` per
configuration (no-mesh, sidecar, sidecar-l4) and keeps it up for the whole
run, so ABAB runs alternate between live meshes instead of rebuilding them.

Layout of one net (CODE is the configuration's short code, TAG the run's tag):

* `l7fp-bench-TAG-CODE-hub`: a bridge `br0`; each pod's veth peer is enslaved
  there (the bridge lives in its own namespace, so the host's FORWARD policy
  and other engineers' rules are never involved);
* `l7fp-bench-TAG-CODE-POD` for POD in client, leaf, frontend, backend, mix0,
  mix11, mix50 (the policy-mix services), with `eth0` at
  198.18.(200+index).(2..8)/24 (benchmarking range only);
* cgroups `<cgroup2>/l7fp-bench/TAG/CODE/POD/{app,sidecar,loadgen}`.

The tag holds the harness's pid, so a later run removes leftovers of a
crashed run (`cleanup_stale`) and never touches a live run's objects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import cgroups, sidecar

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
NETNS_PREFIX = "l7fp-bench-"
POD_NAMES = ("client", "leaf", "frontend", "backend",
             *(sidecar.mix_service(share) for share in sidecar.MIX_SHARES))


def sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def run_tag() -> str:
    return f"p{os.getpid()}"


@dataclass
class Pod:
    """One pod: a netns, an address, a cgroup directory and the processes started in it."""

    name: str
    netns: str
    ip: str
    cgroup: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def leaf(self, role: str) -> Path:
        return self.cgroup / role

    def start(self, role: str, argv: list[str], logdir: Path) -> subprocess.Popen[bytes]:
        """Start argv in this pod's netns and its `role` cgroup, as our child (own session)."""
        target = self.leaf(role)
        logf = open(logdir / f"{self.netns}-{role}.log", "wb")  # noqa: SIM115 (lives with the process)

        def join_cgroup() -> None:
            (target / "cgroup.procs").write_text(str(os.getpid()))

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=logf,
                                stderr=subprocess.STDOUT, preexec_fn=join_cgroup,
                                start_new_session=True, env=env, cwd=str(REPO))
        logf.close()
        self.procs[role] = proc
        return proc


class BenchNet:
    """Pods client/leaf/frontend/backend of one configuration, with or without sidecars.

    `attach` (optional) is called with the pods' cgroups after they exist and
    before any process starts, so a sock_ops program sees every connection.
    """

    def __init__(self, code: str, index: int, *, sidecars: bool, envoy: str, workdir: Path,
                 concurrency: int = 2, tag: str | None = None,
                 attach: Callable[[list[Path]], None] | None = None) -> None:
        self.code, self.index, self.sidecars, self.envoy = code, index, sidecars, envoy
        self.tag = tag or run_tag()
        self.workdir = workdir
        self.concurrency = concurrency
        self.attach = attach
        self.cfgdir: Path | None = None
        self.hub = f"{NETNS_PREFIX}{self.tag}-{code}-hub"
        self.cg_root = cgroups.bench_root() / self.tag / code
        self.pods = {name: Pod(name, f"{NETNS_PREFIX}{self.tag}-{code}-{name}",
                               f"198.18.{200 + index}.{i + 2}", self.cg_root / name)
                     for i, name in enumerate(POD_NAMES)}

    # -- addresses the scenarios use
    @property
    def client(self) -> Pod:
        return self.pods["client"]

    def url(self, pod: str, path: str = "/") -> str:
        return f"http://{self.pods[pod].ip}:{sidecar.APP_PORT}{path}"

    def cost_cgroups(self) -> list[Path]:
        """Cgroups whose CPU counts as the mesh's cost: every app and sidecar, not wrk."""
        out = [p.leaf("app") for p in self.pods.values() if p.name != "client"]
        if self.sidecars:
            out += [p.leaf("sidecar") for p in self.pods.values()]
        return out

    def sidecar_pids(self) -> list[int]:
        return [p.procs["sidecar"].pid for p in self.pods.values() if "sidecar" in p.procs]

    # -- lifecycle
    def up(self) -> None:
        try:
            self._network()
            self._cgroups()
            if self.attach is not None:
                self.attach([p.cgroup for p in self.pods.values()])
            self._processes()
            self._wait_ready()
        except BaseException:
            self.down()
            raise

    def _network(self) -> None:
        sh(["ip", "netns", "add", self.hub])
        sh(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for pod in self.pods.values():
            sh(["ip", "netns", "add", pod.netns])
            sh(["ip", "-n", pod.netns, "link", "add", "eth0", "type", "veth",
                "peer", "name", pod.name, "netns", self.hub])
            sh(["ip", "-n", self.hub, "link", "set", pod.name, "master", "br0", "up"])
            sh(["ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0"])
            sh(["ip", "-n", pod.netns, "link", "set", "eth0", "up"])
            sh(["ip", "-n", pod.netns, "link", "set", "lo", "up"])
            if self.sidecars:
                for rule in sidecar.iptables_rules():
                    sh(["ip", "netns", "exec", pod.netns, "iptables", "-w", *rule])

    def _cgroups(self) -> None:
        for pod in self.pods.values():
            for role in ("app", "sidecar", "loadgen"):
                cgroups.make(pod.leaf(role))

    def _processes(self) -> None:
        py = sys.executable
        apps = {**{sidecar.mix_service(sh): ["leaf", "--name", sidecar.mix_service(sh)]
                   for sh in sidecar.MIX_SHARES},
                "leaf": ["leaf", "--name", "leaf"],
                "backend": ["leaf", "--name", "backend"],
                "frontend": ["frontend", "--name", "frontend",
                             "--backend", f"{self.pods['backend'].ip}:{sidecar.APP_PORT}"]}
        for name, args in apps.items():
            self.pods[name].start("app", [py, "-m", "benchmarks.apps", *args], self.workdir)
        if self.sidecars:
            # the sidecar runs as uid 1337: its config goes to a directory that
            # uid can reach (a pytest tmp_path or a 0700 parent would not do)
            self.cfgdir = Path(tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{self.tag}-{self.code}-"))
            self.cfgdir.chmod(0o755)
            cfg = self.cfgdir / "envoy.json"
            mix_ips = {sh: self.pods[sidecar.mix_service(sh)].ip for sh in sidecar.MIX_SHARES}
            cfg.write_text(json.dumps(sidecar.bootstrap(mix_ips), indent=1))
            cfg.chmod(0o644)
            for pod in self.pods.values():
                pod.start("sidecar", sidecar.envoy_argv(self.envoy, str(cfg), self.concurrency),
                          self.workdir)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        """Ready when the client pod gets a 200 from the leaf and through frontend->backend."""
        deadline = time.monotonic() + timeout
        mixes = [self.url(sidecar.mix_service(sh), sidecar.policy_paths(sh)[-1])
                 for sh in sidecar.MIX_SHARES]
        for target in (self.url("leaf"), self.url("frontend"), *mixes):
            while True:
                self._check_alive()
                proc = sh(["ip", "netns", "exec", self.client.netns, "curl", "-s", "-o",
                           "/dev/null", "-w", "%{http_code}", "--max-time", "2", target], check=False)
                if proc.stdout.strip() == "200":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.code}: {target} not answering 200 from the client "
                                       f"pod after {timeout:.0f}s (got {proc.stdout.strip()!r}); "
                                       f"logs in {self.workdir}")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        for pod in self.pods.values():
            for role, proc in pod.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.code}: {pod.name} {role} exited with "
                                       f"{proc.returncode}; see {self.workdir}/{pod.netns}-{role}.log")

    def down(self) -> None:
        """Idempotent teardown: processes (by pid), cgroups, namespaces."""
        for pod in self.pods.values():
            for proc in pod.procs.values():
                stop(proc)
            pod.procs.clear()
        try:
            cgroups.remove_tree(self.cg_root)
        except RuntimeError as exc:
            log.warning("%s", exc)
        for d in (self.cg_root.parent, self.cg_root.parent.parent):  # the run's dir, the root
            try:
                os.rmdir(d)
            except OSError:
                break  # another topology of this run, or another run, still uses it
        for pod in self.pods.values():
            sh(["ip", "netns", "del", pod.netns], check=False)
        sh(["ip", "netns", "del", self.hub], check=False)
        if self.cfgdir is not None:
            shutil.rmtree(self.cfgdir, ignore_errors=True)
            self.cfgdir = None


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cleanup_stale() -> list[str]:
    """Remove namespaces and cgroups of earlier runs whose harness process is gone."""
    removed: list[str] = []
    names = sh(["ip", "netns", "list"], check=False).stdout.split()
    for name in names:
        if name.startswith(NETNS_PREFIX) and not _owner_alive(name[len(NETNS_PREFIX):]):
            for pid in sh(["ip", "netns", "pids", name], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(["ip", "netns", "del", name], check=False)
            removed.append(name)
    root = cgroups.bench_root()
    if root.exists():
        for tagdir in root.iterdir():
            if tagdir.is_dir() and not _owner_alive(tagdir.name):
                cgroups.remove_tree(tagdir)
                removed.append(str(tagdir))
    return removed


def _owner_alive(tagged: str) -> bool:
    """Whether the harness pid encoded as `pNNN` at the start of a name still runs."""
    tag = tagged.split("-", 1)[0]
    if not (tag.startswith("p") and tag[1:].isdigit()):
        return True  # not ours in this format: leave it alone
    return Path(f"/proc/{tag[1:]}").exists()
