"""Whether a mesh name may be started now: the one rule for `Mesh.up`, so for
`l7fp mesh up`, `l7fp demo`, the benchmark harness and the tests.

* running, or being started (or stopped) by a live process -> refused (`MeshBusy`);
* left by a crashed run (a state directory, namespaces, links, rules or a
  cgroup of the name, and no live process holding it) -> removed, and said;
* else free.

"A live process holds it" is the name's lock (mesh.namelock): `Mesh.up` takes
it (`claim`) before it looks at or removes anything of the name and hands it to
the daemon it starts, which holds it until it exits. Two `mesh up` of one name
cannot both pass, and neither removes what the other is building.
"""

from __future__ import annotations

import os

from mesh import namelock, teardown
from mesh.errors import MeshBusy
from mesh.supervisor import pid_alive


def claim(name: str) -> tuple[int, list[str]]:
    """Hold mesh `name` for a start: (the lock fd, one line per object a crashed
    run left and this call removed). Raises MeshBusy, holding nothing, when a live
    process runs or starts it. The caller passes the fd to the daemon it starts
    and closes its own copy once the daemon runs, or drops it (namelock.drop) when
    the start failed."""
    fd = namelock.try_lock(name)
    if fd is None:
        raise MeshBusy(name, busy_what(name))
    try:
        if teardown.daemon_pid(name) is not None:  # a daemon that never took the lock
            raise MeshBusy(name, busy_what(name))
        return fd, teardown.down(name, stop_running_daemon=False)
    except BaseException:
        os.close(fd)
        raise


def busy_what(name: str) -> str:
    """What holds mesh `name`, for `MeshBusy`: its running daemon, else the process starting it."""
    state = teardown.read_state(name) or {}
    pid = int(state.get("pid") or 0)
    if pid and teardown.is_daemon(pid, name) and state.get("ready") is False:
        return f"is being started (daemon pid {pid})"
    if pid and teardown.is_daemon(pid, name):
        return f"is running (daemon pid {pid}, {len(state.get('pods', []))} pods)"
    holder = namelock.holder_pid(name)
    if holder and pid_alive(holder):
        return f"is being started (pid {holder})"
    return "is being started or taken down by another process"


def leftovers_line(name: str, removed: list[str]) -> str:
    """The one line saying what `claim` removed of a crashed run ('' when nothing)."""
    if not removed:
        return ""
    return (f"mesh {name!r} was left by a crashed run: removed {len(removed)} object(s) "
            f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
