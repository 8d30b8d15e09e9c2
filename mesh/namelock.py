"""The lock of a mesh name: flock(LOCK_EX) on naming.lock_path(name).

Held by whoever starts or runs mesh `name`: `Mesh.up` takes it (mesh.claim),
hands the same lock to the daemon it starts (an inherited fd), and the daemon
holds it until it exits; any exit, also SIGKILL, releases it. The file holds
the pid of its latest holder, for messages and for `mesh down` of a daemon that
has not written state.json yet. Called by mesh.claim, mesh.daemon, mesh.teardown.

The file is removed by its holder when the mesh is gone (`drop`): by the daemon
once it holds the lock alone (after READY), by `Mesh.up` after it tore a failed
start down (the daemon only closes its copy then). Removing a lock
file races with a process that opened it just before: it would lock the removed
file while a third one creates and locks a new one. `try_lock` closes that gap:
after flock it checks that the path still names the file it locked, else retries.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mesh import naming


def try_lock(name: str, attempts: int = 5) -> int | None:
    """The lock of mesh `name` as an fd the caller owns (closing it releases the
    lock unless a child holds a copy), or None when another process holds it."""
    path = Path(naming.lock_path(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _names(path, fd):
            record_holder(fd)
            return fd
        os.close(fd)  # its holder removed it meanwhile (`drop`): lock the new file
    raise RuntimeError(f"lock file {path} keeps being replaced; is something removing it?")


def _names(path: Path, fd: int) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def record_holder(fd: int) -> None:
    """Write this process's pid into the held lock file (the daemon does too)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def drop(name: str, fd: int) -> None:
    """Remove the lock file of mesh `name`, then release it: its holder's last
    act once nothing of the mesh is left (the daemon's exit, a failed start,
    `mesh down` after a crash)."""
    path = Path(naming.lock_path(name))
    if _names(path, fd):  # not a newer holder's file (the daemon may have dropped ours)
        path.unlink(missing_ok=True)
    os.close(fd)


def holder_pid(name: str) -> int | None:
    """The pid last written into the lock file (`Mesh.up`'s, then its daemon's);
    meaningful while `is_held`."""
    try:
        return int(Path(naming.lock_path(name)).read_text().strip())
    except (OSError, ValueError):
        return None


def is_held(name: str) -> bool:
    """Whether a live process holds the lock of `name`, read from /proc/locks
    (looking, not locking: a try would fail a `mesh up` starting at that instant)."""
    try:
        st = Path(naming.lock_path(name)).stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(f" {dev} " in line for line in locks.splitlines() if " FLOCK " in line)
