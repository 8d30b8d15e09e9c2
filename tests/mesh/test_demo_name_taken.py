"""`make demo` always names its mesh `demo`: with a mesh of that name already
there (another user's, or a leftover), `l7fp demo` went on to `Mesh.up`,
which removes a starting or crashed mesh of the name and builds its own. Now
it says what is there and how to take it down, in one line, exit 1, before
building anything. The state root is a temporary one and the mesh name the
test's own: a real `demo` mesh (another engineer's) is never looked at."""

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


@pytest.fixture
def name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))

    def no_build() -> None:  # without the check, the demo would get this far
        raise runner.MeshError("test: the mesh would be built now")
    monkeypatch.setattr(runner, "preflight", no_build)
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


def test_a_starting_or_crashed_mesh_of_the_name_is_said(name: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / name).mkdir()
    assert _demo(name, capsys) == (1, "", (
        f"l7fp demo: a mesh named {name!r} is starting, or its start crashed ({tmp_path / name} "
        f"has no state.json): {HOW.format(n=name)}\n"))
    (tmp_path / name / "state.json").write_text(json.dumps({"name": name, "pid": 0, "pods": []}))
    assert _demo(name, capsys) == (1, "", (
        f"l7fp demo: a mesh named {name!r} was left by a crashed run (daemon pid 0 is gone): "
        f"{HOW.format(n=name)}\n"))


def test_a_free_name_goes_on_to_build(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The check lets a free name through (here up to the stubbed preflight)."""
    code, out, err = _demo(name, capsys)
    assert code == 1 and err == "l7fp demo: test: the mesh would be built now\n"
    assert out == f"starting mesh {name} from {Path(runner.__file__).parent.parent}/compose/demo/mesh.yaml ...\n"
