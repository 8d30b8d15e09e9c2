"""One mesh name, one owner (mesh.claim): two `Mesh.up` of one name at once,
and the name of a crashed mesh.

`Mesh.up` refused only a *running* daemon and otherwise called `teardown.down`
on the name: a second `mesh up` of a name being started removed the first one's
namespaces under it. Now a live process holding the name's lock (the starting
`Mesh.up`, then its daemon) makes every other start fail with a MeshError naming
the mesh, touching nothing; a name whose daemon died is cleaned and started, and
the cleanup said in one line. Real meshes: one pod, no sidecars (~2 s each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from meshtest_util import leftovers, unique_name

from mesh import claim, cli, namelock, naming, plumbing, teardown
from mesh.runner import Mesh, MeshBusy, MeshError, repo_pythonpath
from mesh.supervisor import pid_alive
from xds_server.cli import main

ONE_POD = """
name: t9-claim
services:
  web:
    command: ["${PYTHON}", -m, mesh.apps.social, --port, "8080"]
    ports: [8080]
"""


def _up_both(path: Path, name: str) -> list[Any]:
    """Two `Mesh.up` of `name`, released at the same instant; each one's state or error."""
    gate, results = threading.Barrier(2), [None, None]

    def one(i: int) -> None:
        m = Mesh(path, name, sidecars="none", timeout=30)
        gate.wait()
        try:
            results[i] = m.up()
        except MeshError as exc:
            results[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return results


def _alive(name: str, state: dict[str, Any]) -> None:
    """Everything of the running mesh is in place: daemon, app, namespace."""
    assert teardown.is_daemon(int(state["pid"]), name)
    assert all(pid_alive(p) for p in state["pods"][0]["pids"].values())
    assert state["pods"][0]["netns"] in plumbing.netns_list()


@pytest.mark.mesh
def test_two_ups_of_one_name_one_runs_and_a_crashed_one_is_cleaned(
        kernel: None, tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE_POD)
    name = "t9-" + unique_name("c")
    try:
        results = _up_both(path, name)
        states = [r for r in results if isinstance(r, dict)]
        errors = [r for r in results if isinstance(r, MeshError)]
        assert len(states) == 1 and len(errors) == 1, results
        assert isinstance(errors[0], MeshBusy) and repr(name) in str(errors[0]), errors[0]
        assert errors[0].what.startswith(("is being started (", "is running (daemon pid ")), \
            errors[0].what
        state = teardown.read_state(name)
        assert state is not None and state["pid"] == states[0]["pid"]
        _alive(name, state)

        with pytest.raises(MeshBusy) as busy:  # once up: refused, said as running
            Mesh(path, name, sidecars="none").up()
        assert busy.value.what == f"is running (daemon pid {state['pid']}, 1 pods)"
        _alive(name, state)
        assert namelock.is_held(name) and namelock.holder_pid(name) == state["pid"]

        os.kill(int(state["pid"]), signal.SIGKILL)  # a crash: its pod stays behind
        deadline = time.monotonic() + 10  # its exit closes its files (the lock) a moment
        while namelock.is_held(name) and time.monotonic() < deadline:  # after its cmdline
            time.sleep(0.05)
        assert not namelock.is_held(name) and not teardown.is_daemon(int(state["pid"]), name)
        said: list[str] = []
        again = Mesh(path, name, sidecars="none", timeout=30).up(say=said.append)
        assert len(said) == 1 and said[0].startswith(
            f"mesh {name!r} was left by a crashed run: removed "), said
        assert f"netns {state['pods'][0]['netns']}" in said[0]
        assert again["pid"] != state["pid"]
        _alive(name, again)
    finally:
        teardown.down(name)
    assert leftovers(name) == []
    assert not Path(naming.lock_path(name)).exists()  # the daemon removed it on its way out


def test_the_name_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One holder at a time; `drop` removes the file; a process that locked the
    file just as its holder dropped it locks the new file instead (no two holders)."""
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    fd = namelock.try_lock("t9-n")
    assert fd is not None and namelock.is_held("t9-n")
    assert namelock.holder_pid("t9-n") == os.getpid()
    assert namelock.try_lock("t9-n") is None
    late = os.open(naming.lock_path("t9-n"), os.O_RDWR)  # opened before the drop
    namelock.drop("t9-n", fd)
    assert not Path(naming.lock_path("t9-n")).exists() and not namelock.is_held("t9-n")
    opens = [late]  # try_lock's first open gives the removed file, as if it raced the drop
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opens.pop() if opens else real_open(*a, **k))
    again = namelock.try_lock("t9-n")
    monkeypatch.setattr(os, "open", real_open)
    assert again is not None and again != late
    assert os.fstat(again).st_ino == Path(naming.lock_path("t9-n")).stat().st_ino
    namelock.drop("t9-n", again)


EXITS = """
name: t9-fails
services:
  web:
    command: ["${PYTHON}", -c, "raise SystemExit(3)"]
    ports: [8080]
"""


@pytest.mark.mesh
def test_a_failed_start_keeps_the_name_until_its_teardown_is_done(
        kernel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start whose app exits at once: while `Mesh.up` removes what it made, the
    name stays locked, so another `mesh up` of the name (tried right then) is
    refused rather than claiming it and losing its mesh to that teardown. The
    daemon used to remove the lock file as it exited, before that teardown."""
    path = tmp_path / "mesh.yaml"
    path.write_text(EXITS)
    name = "t9-" + unique_name("f")
    seen: list[str] = []
    real_down = teardown.down

    def down_racing_a_claim(mesh: str, *args: Any, **kw: Any) -> list[str]:
        if mesh == name and not args and not kw:  # Mesh.up's teardown of its failed start
            try:
                fd, _ = claim.claim(mesh)
            except MeshBusy as exc:
                seen.append(f"busy: {exc.what}")
            else:
                seen.append("claimed")
                namelock.drop(mesh, fd)
        return real_down(mesh, *args, **kw)
    monkeypatch.setattr(teardown, "down", down_racing_a_claim)
    try:
        with pytest.raises(MeshError, match="exited during start"):
            Mesh(path, name, sidecars="none", timeout=30).up()
        assert len(seen) == 1 and seen[0].startswith("busy: "), seen
    finally:
        real_down(name)
    assert leftovers(name) == []
    assert not Path(naming.lock_path(name)).exists() and not namelock.is_held(name)


def test_down_of_a_name_being_started_with_no_daemon_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh down` while a `mesh up` holds the name and no daemon comes (here:
    this process holds the lock): not "nothing removed" (the mesh would come up
    anyway) but who is starting it, and a failure status."""
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    monkeypatch.setattr(cli, "START_WAIT", 0.3)
    fd = namelock.try_lock("t9-s")
    assert fd is not None
    try:
        assert main(["mesh", "down", "--name", "t9-s"]) == 1
    finally:
        namelock.drop("t9-s", fd)
    err = capsys.readouterr().err
    assert f"mesh t9-s is being started by pid {os.getpid()} (no daemon after 0s)" in err, err


@pytest.mark.mesh
def test_down_just_after_the_claim_stops_the_start(
        kernel: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh down` right after a `mesh up` claimed the name, before its daemon
    wrote its pid: it waits for the daemon and stops it, so the mesh never comes
    up (it said "no mesh of that name here, nothing removed" and the mesh came up)."""
    path = tmp_path / "mesh.yaml"
    path.write_text(ONE_POD)
    name = "t9-" + unique_name("d")
    codes: list[int] = []
    downer = threading.Thread(target=lambda: codes.append(main(["mesh", "down", "--name", name])))
    try:
        with pytest.raises(MeshError):
            Mesh(path, name, sidecars="none", timeout=30).up(claimed=downer.start)
        downer.join(60)
        out = capsys.readouterr().out
        assert codes == [0] and f"mesh {name} down: daemon stopped" in out, (codes, out)
    finally:
        downer.join(60)
        teardown.down(name)
    assert leftovers(name) == []
    assert not Path(naming.lock_path(name)).exists() and not namelock.is_held(name)


HUNG_DAEMON = """
import os, signal, sys, time
from mesh import namelock, naming
naming.STATE_ROOT = sys.argv[3]
fd = namelock.try_lock(sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # hangs: stop_daemon SIGKILLs it
if os.fork() == 0:  # a copy of the lock that outlives the kill a moment (as file closing does)
    time.sleep(1.0)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_stop_daemon_returns_once_the_killed_daemons_lock_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After SIGKILL the lock goes a moment later; `down`'s last try_lock then
    failed and the lock file stayed. stop_daemon now waits (bounded) for it."""
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", HUNG_DAEMON, "mesh.daemon", "t9-h", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        assert teardown.daemon_pid("t9-h") == proc.pid
        assert teardown.stop_daemon("t9-h", timeout=0.3)
        assert not namelock.is_held("t9-h")
    finally:
        proc.kill()
        proc.wait(5)
