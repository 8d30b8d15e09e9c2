"""Start and watch the processes of a mesh (apps, sidecars, control plane).

Owned by the mesh daemon (`mesh.daemon`), which stays the parent of every
process it starts: each child joins its pod's cgroup before exec, enters the
pod's network namespace with `ip netns exec` (which also mounts the pod's
/etc/netns hosts file), and gets a parent-death signal from `setpriv`, so
no process outlives a crashed daemon. Output goes to one log file per process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAX_RESTARTS = 5


def pod_argv(argv: Sequence[str], netns: str | None, uid: int | None = None) -> list[str]:
    """Wrap `argv` to run in `netns` (None: the host's), as `uid`, with a death signal."""
    priv = ["setpriv", "--pdeathsig", "SIGTERM"]
    if uid is not None:
        priv += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    wrapped = [*priv, "--", *argv]
    return ["ip", "netns", "exec", netns, *wrapped] if netns else wrapped


def _join(cgroup: Path | None) -> None:
    # Runs in the child between fork and exec: the cgroup must hold the
    # process before it opens any socket (sock_ops programs are cgroup-scoped).
    if cgroup is not None:
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write("0\n")


@dataclass
class Proc:
    """One supervised process; `argv` is the full command (already wrapped)."""

    name: str
    argv: list[str]
    log_path: Path
    cgroup: Path | None = None
    env: dict[str, str] | None = None
    restart: bool = True
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    history: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            cgroup = self.cgroup
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=lambda: _join(cgroup))
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        if not self.popen or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class Supervisor:
    """Holds the processes; `check()` restarts crashed ones (bounded)."""

    def __init__(self) -> None:
        self.procs: dict[str, Proc] = {}
        self.stopping = False

    def add(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        proc.start()
        log.info("started %s pid %s", proc.name, proc.pid)
        return proc

    def check(self) -> list[str]:
        """Restart crashed processes; return lines describing what happened."""
        events = []
        for p in self.procs.values():
            if self.stopping or p.popen is None or p.popen.poll() is None:
                continue
            code = p.popen.returncode
            p.history.append(code)
            if not p.restart or p.restarts >= MAX_RESTARTS:
                if p.restart:
                    events.append(f"{p.name} exited {code}; gave up after {p.restarts} restarts")
                    p.restart = False
                continue
            p.restarts += 1
            events.append(f"{p.name} exited {code}; restart {p.restarts}/{MAX_RESTARTS}")
            time.sleep(min(0.2 * p.restarts, 1.0))
            p.start()
        return events

    def stop_all(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.alive() and p.popen:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            if p.popen is None:
                continue
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs. A zombie does not: a killed mesh's processes
    stay zombies until init reaps them (seconds on this host), and `mesh status`
    showed a `kill -9`ed daemon and its pods as up meanwhile."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
