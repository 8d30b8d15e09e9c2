"""`make demo` always names its mesh `demo`: with a mesh of that name already
there (another user's, or a leftover), `l7fp demo` went on to `Mesh.up`,
which removed a starting or crashed mesh of the name and built its own. Now
(mesh.claim, the rule of `Mesh.up` itself) a running or starting one is said,
with how to take it down or pick another name, in one line, exit 1, before
building anything; a crashed one's leftovers are removed, said in one line,
and the demo goes on. The state root is a temporary one and the mesh name the
test's own: a real `demo` mesh (another engineer's) is never looked at. Root:
the cleanup of a crashed name looks for its namespaces, links and rules."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mesh import naming, runner
from xds_server.cli import main

HOW = ("take it down with `l7fp mesh down --name {n}` (if it is yours), or give this demo "
       "another name: `l7fp demo --name NAME` (`make demo DEMO_NAME=NAME`)")
STARTING = "starting mesh {n} from " + str(Path(runner.__file__).parent.parent) + \
    "/compose/demo/mesh.yaml ...\n"


@pytest.fixture
def name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    monkeypatch.setattr(runner, "preflight", lambda: None)

    def no_build(_self: runner.Mesh, _lock: int) -> dict:  # the name's check passed
        raise runner.MeshError("test: the mesh would be built now")
    monkeypatch.setattr(runner.Mesh, "_spawn", no_build)
    return f"ux2-{uuid.uuid4().hex[:8]}"


def _demo(name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["demo", "--name", name, "--duration", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_running_mesh_of_the_name_is_said(name: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A live process whose command line is a mesh daemon's of that name."""
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "mesh.daemon", "--name", name])
    try:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps(
            {"name": name, "pid": daemon.pid, "pods": [{"name": "a-0"}, {"name": "b-0"}]}))
        code, out, err = _demo(name, capsys)
    finally:
        daemon.kill()
        daemon.wait(5)
    assert (code, out) == (1, "")
    assert err == (f"l7fp demo: a mesh named {name!r} is running (daemon pid {daemon.pid}, 2 pods): "
                   f"{HOW.format(n=name)}\n")


def test_a_starting_mesh_of_the_name_is_said(name: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A live process holds the name's lock (another `mesh up` of it, or its daemon)."""
    (tmp_path / name).mkdir()  # what it has built so far: not to be touched
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); "
        "print('held', flush=True); time.sleep(60)"), naming.lock_path(name)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        code, out, err = _demo(name, capsys)
    finally:
        holder.kill()
        holder.wait(5)
    assert (code, out) == (1, "")
    assert err == (f"l7fp demo: a mesh named {name!r} is being started (pid {holder.pid}): "
                   f"{HOW.format(n=name)}\n")
    assert (tmp_path / name).is_dir()


def test_a_crashed_mesh_of_the_name_is_cleaned_and_said(
        kernel: None, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its daemon is gone (pid 0): what it left is removed, one line, and the demo goes on."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "state.json").write_text(json.dumps({"name": name, "pid": 0, "pods": []}))
    code, out, err = _demo(name, capsys)
    assert (code, err) == (1, "l7fp demo: test: the mesh would be built now\n")
    assert out == STARTING.format(n=name) + (
        f"mesh {name!r} was left by a crashed run: removed 1 object(s) (state {tmp_path / name})\n")
    assert not (tmp_path / name).exists()


def test_a_free_name_goes_on_to_build(kernel: None, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The check lets a free name through (here up to the stubbed start), saying nothing."""
    assert _demo(name, capsys) == (1, STARTING.format(n=name),
                                   "l7fp demo: test: the mesh would be built now\n")
