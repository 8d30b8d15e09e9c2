"""Whether a mesh name may be started now: the one rule for `Mesh.up`, so for
`l7fp mesh up`, `l7fp demo`, the benchmark harness and the tests.

* running, or being started (or stopped) by a live process -> refused (`Busy`);
* left by a crashed run (a state directory, namespaces, links, rules or a
  cgroup of the name, and no live process holding it) -> removed, and said;
* else free.

"A live process holds it" is a lock: flock(LOCK_EX) on naming.lock_path(name).
`Mesh.up` takes it (`claim`) before it looks at or removes anything of the name,
and hands the very lock to the mesh daemon it starts (an inherited fd,
`--lock-fd`), which holds it until it exits; a process's exit, also a crash or
SIGKILL, releases it. Two `mesh up` of one name cannot both pass, and neither
removes what the other is building. The lock file holds the pid of its latest
holder (`Mesh.up`'s, then the daemon's) for messages and for `mesh down` of a
daemon that has not written state.json yet. Lock files are never removed:
removing one that another process has open would give two holders of two files.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mesh import naming, teardown
from mesh.supervisor import pid_alive


class Busy(Exception):
    """Mesh `name` is running or being started by a live process; `what` says
    which, as the end of a sentence about it ("is running (daemon pid 12, 3 pods)")."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"mesh {name!r} {what}")
        self.name, self.what = name, what


def try_lock(name: str) -> int | None:
    """The lock of mesh `name` as an fd the caller owns (closing it releases the
    lock unless a child inherited it), or None when another process holds it."""
    path = Path(naming.lock_path(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    record_holder(fd)
    return fd


def record_holder(fd: int) -> None:
    """Write this process's pid into the held lock file (the daemon calls it too)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def claim(name: str) -> tuple[int, list[str]]:
    """Hold mesh `name` for a start: (the lock fd, one line per object a crashed
    run left and this call removed). Raises Busy, holding nothing, when a live
    process runs or starts it. The caller passes the fd to the daemon it starts
    and closes its own copy once the daemon runs or the start failed."""
    fd = try_lock(name)
    if fd is None:
        raise Busy(name, busy_what(name))
    try:
        if teardown.daemon_pid(name) is not None:  # a daemon that never took the lock
            raise Busy(name, busy_what(name))
        return fd, teardown.down(name, stop_running_daemon=False)
    except BaseException:
        os.close(fd)
        raise


def busy_what(name: str) -> str:
    """What holds mesh `name`, for `Busy`: its running daemon, else the process starting it."""
    state = teardown.read_state(name) or {}
    pid = int(state.get("pid") or 0)
    if pid and teardown.is_daemon(pid, name):
        return f"is running (daemon pid {pid}, {len(state.get('pods', []))} pods)"
    holder = teardown.holder_pid(name)
    if holder and pid_alive(holder):
        return f"is being started (pid {holder})"
    return "is being started or taken down by another process"


def leftovers_line(name: str, removed: list[str]) -> str:
    """The one line saying what `claim` removed of a crashed run ('' when nothing)."""
    if not removed:
        return ""
    return (f"mesh {name!r} was left by a crashed run: removed {len(removed)} object(s) "
            f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
