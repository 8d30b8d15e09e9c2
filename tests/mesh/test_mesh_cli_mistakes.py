"""`l7fp mesh` / `l7fp demo` given a wrong argument: one line naming it,
a non-zero exit, never a traceback, and nothing started.

In-process (`xds_server.cli.main`): an exception that escapes fails the test. No mesh
is started by any of them (each mistake is caught before that), but the last: a policy
the control plane refuses, seen only once it starts (root, a one-pod mesh, ~4 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from meshtest_util import leftovers, unique_name

from mesh import namelock, teardown
from xds_server.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "compose" / "demo" / "mesh.yaml")


def test_mesh_file_yaml_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PyYAML's several lines (caret drawing, `in "<unicode string>"`) became one."""
    bad = tmp_path / "mesh.yaml"
    bad.write_text("name: t\nservices:\n  a:\n    command: [sleep,\n")
    assert main(["mesh", "compose", str(bad), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        f"l7fp mesh: {bad}: not valid YAML: line 5, column 1: "
        "expected the node content, but found '<stream end>'\n")


def test_compose_out_on_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`-o FILE` ended in a FileExistsError traceback."""
    out = tmp_path / "taken"
    out.write_text("")
    assert main(["mesh", "compose", DEMO, "-o", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"l7fp mesh: --out {out}: cannot write there: {out}: File exists\n")


@pytest.mark.parametrize("argv", [
    ["mesh", "up", DEMO, "--name", "ux-never", "--timeout", "-1"],
    ["demo", "--name", "ux-never", "--duration", "0"],
    ["demo", "--name", "ux-never", "--rate", "9000"],
    ["demo", "--name", "ux-never", "--rate", "nan"],
    ["mesh", "audit", "--name", "ux-never", "--timeout", "0"],
    ["mesh", "audit", "--name", "ux-never", "--wait", "-1"],
])
def test_bad_seconds_and_rates_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh up --timeout -1` built the whole mesh and failed at once ("not ready after -1s");
    `demo --rate 0` built it and then said `--rate must be in (0, 5000] ...`."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    flag, value = argv[-2:]
    assert f"argument {flag}: '{value}': expected a number " in capsys.readouterr().err


POLICY_TYPO = """
name: t
services:
  a:
    command: ["${PYTHON}", -c, "import time; time.sleep(300)"]
    ports: [8080]
    policy: {outbound: {routes: [{match: {prefx: /}}]}}
"""


@pytest.mark.mesh
def test_control_plane_refusing_the_policy_says_why(kernel: None, tmp_path: Path) -> None:
    """A typo in a policy route (`prefx`) stopped `mesh up` with `control plane exited; see
    /run/l7fp/mesh/NAME/logs/control-plane.log`, a file the teardown had just removed."""
    path = tmp_path / "mesh.yaml"
    path.write_text(POLICY_TYPO)
    name = unique_name("cp")
    kept = Path(f"/tmp/l7fp-mesh-{name}-failed")
    try:
        r = subprocess.run([sys.executable, "-m", "xds_server", "mesh", "up", str(path), "--name", name,
                            "--timeout", "30"], capture_output=True, text=True, timeout=90)
        assert r.returncode == 1
        assert r.stderr.strip() == (
            "l7fp mesh: control plane exited: config rejected: mesh.json: resources[4]."
            "virtual_hosts[0].routes[0].match: Unknown field 'prefx' in message RouteMatch "
            f"(did you mean 'prefix'?) (logs kept in {kept})")
        assert leftovers(name) == []
    finally:
        teardown.down(name)
        shutil.rmtree(kept, ignore_errors=True)


def test_logs_of_a_service_of_the_control_plane_and_of_a_typo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh logs frontend` (a service, as `mesh exec` takes) and `mesh logs control-plane`
    said `no logs for ...`; a typo did not say which pods there are. The state directory
    is a temporary one laid out as the daemon writes it (no mesh needed). A service's
    pod is the one `mesh exec` finds (its first in the state: user-1, which the log
    files' names and `-0` missed)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for f in ("frontend-0.app.log", "frontend-0.envoy.log", "control-plane.log", "user-1.app.log"):
        (logs / f).write_text(f"{f} says hello\n")
    (tmp_path / "state.json").write_text(json.dumps({"name": "ux-never", "pods": [
        {"name": "frontend-0", "service": "frontend"}, {"name": "user-1", "service": "user"}]}))
    monkeypatch.setattr(teardown, "state_dir", lambda _name: tmp_path)
    assert main(["mesh", "logs", "--name", "ux-never", "user"]) == 0
    assert capsys.readouterr().out == f"==> {logs / 'user-1.app.log'} <==\nuser-1.app.log says hello\n\n"
    assert main(["mesh", "logs", "--name", "ux-never", "frontend"]) == 0
    assert capsys.readouterr().out == (f"==> {logs / 'frontend-0.app.log'} <==\nfrontend-0.app.log says hello\n\n"
                                       f"==> {logs / 'frontend-0.envoy.log'} <==\nfrontend-0.envoy.log says hello\n\n")
    assert main(["mesh", "logs", "--name", "ux-never", "control-plane"]) == 0
    assert "control-plane.log says hello" in capsys.readouterr().out
    assert main(["mesh", "logs", "--name", "ux-never", "fronted"]) == 1
    assert capsys.readouterr().err == (f"l7fp mesh: no logs for fronted under {tmp_path}; "
                                       "pods: ['control-plane', 'frontend-0', 'user-1']\n")


def test_status_of_a_mesh_never_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --name said `no state file (starting, or crashed: l7fp mesh down ...)`,
    as if that mesh existed; now it says it is not running and which ones are. (The
    state root is a temporary one.)"""
    from mesh import naming
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    (tmp_path / "ux-real").mkdir()
    assert main(["mesh", "status", "--name", "ux-rael"]) == 1
    assert capsys.readouterr().err == "l7fp mesh: mesh 'ux-rael' is not running (running: ux-real)\n"
    assert main(["mesh", "exec", "--name", "ux-rael", "a", "--", "true"]) == 1
    assert capsys.readouterr().err == "l7fp mesh: mesh 'ux-rael' is not running (running: ux-real)\n"
    assert main(["mesh", "logs", "--name", "ux-rael"]) == 1  # was `no logs for the daemon under ...`
    assert capsys.readouterr().err == "l7fp mesh: mesh 'ux-rael' is not running (running: ux-real)\n"
    assert main(["mesh", "status", "--name", "ux-real"]) == 1  # its directory, no state.json
    assert capsys.readouterr().err == (
        "l7fp mesh: mesh 'ux-real' was left by a crashed run (no state file, nothing holds it): "
        "`l7fp mesh down --name ux-real` removes what it left\n")
    lock = namelock.try_lock("ux-real")  # as `mesh up` holds it while it starts the mesh
    try:
        assert main(["mesh", "status", "--name", "ux-real"]) == 1
        assert capsys.readouterr().err == (f"l7fp mesh: mesh 'ux-real' is being started (pid "
                                           f"{os.getpid()}): no state file yet\n")
    finally:
        assert lock is not None
        namelock.drop("ux-real", lock)


def test_status_of_a_mesh_being_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon writes state.json early (the fast path reads it); `mesh status` then
    showed every app `DEAD` and `control plane: none (xds ads)`: a mesh being built
    looked broken. Now its state says `ready: false` and status says starting."""
    from mesh import naming
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    (tmp_path / "ux-st").mkdir()
    (tmp_path / "ux-st" / "state.json").write_text(json.dumps({
        "name": "ux-st", "pid": os.getpid(), "sidecars": "envoy", "xds_mode": "ads",
        "control_plane_pid": None, "ready": False, "fastpath": "off", "logs": "L",
        "pods": [{"name": "a-0", "ip": "198.18.9.2", "netns": "n", "pids": {}}]}))
    monkeypatch.setattr("mesh.runner.status_rows", lambda st: [
        {"pod": "a-0", "ip": "198.18.9.2", "netns": "n", "alive": {}, "sidecar": "-"}])
    assert main(["mesh", "status", "--name", "ux-st"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"mesh ux-st: daemon pid {os.getpid()} up, starting (not ready yet), sidecars envoy, "
        "fastpath off, logs L",
        "control plane: not started yet",
        "POD                  IP             APP    ENVOY  SIDECAR",
        "a-0                  198.18.9.2     -      -      -"]


@pytest.mark.mesh
def test_down_of_a_name_that_is_not_there(kernel: None, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh down --name TYPO` said `no daemon running; 0 leftover object(s) removed`,
    exit 0, as after a clean down, while the mesh meant kept running."""
    from mesh import naming
    monkeypatch.setattr(naming, "STATE_ROOT", str(tmp_path))
    (tmp_path / "ux-real").mkdir()
    assert main(["mesh", "down", "--name", "ux-rael"]) == 0
    assert capsys.readouterr().out == ("mesh ux-rael down: no mesh of that name here, nothing "
                                       "removed (running: ux-real)\n")


def test_a_bad_name_is_said_of_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh up FILE --name UX_bad` blamed the file (`FILE: name: 'UX_bad' must match ^...$`)."""
    assert main(["mesh", "up", DEMO, "--name", "UX_bad"]) == 1
    assert capsys.readouterr().err == (
        "l7fp mesh: --name: 'UX_bad' must be lower-case letters, digits and '-', starting with a "
        "letter, at most 23 characters (^[a-z][a-z0-9-]{0,22}$)\n")


@pytest.mark.parametrize("cmd", [["mesh", "up", DEMO], ["demo"]])
def test_fastpath_on_with_file_xds_is_refused(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`--xds file --fastpath on` started a mesh whose `status` said `fastpath on` while no
    control plane, hence no fast-path agent, ran."""
    assert main([*cmd, "--name", "ux-never", "--xds", "file", "--fastpath", "on"]) == 1
    assert capsys.readouterr().err.endswith(
        ": --fastpath on needs --xds ads: the fast path runs in the control plane, which "
        "--xds file does not start\n")


def test_a_mesh_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh up LATIN1.yaml` (also compose, demo --mesh, a policies: file) was a
    UnicodeDecodeError traceback; now one line naming the file and the byte."""
    bad = tmp_path / "mesh.yaml"
    bad.write_bytes(b"name: t9-u\nservices: {caf\xe9: {}}\n")
    assert main(["mesh", "compose", str(bad), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"l7fp mesh: {bad}: not UTF-8 text (byte 25)\n"
    assert main(["mesh", "up", str(bad), "--name", "t9-u"]) == 1
    assert capsys.readouterr().err == f"l7fp mesh: {bad}: not UTF-8 text (byte 25)\n"


def test_ctrl_c_while_the_commands_load(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the first second of `l7fp mesh up` (the parser imports every
    subcommand) was a KeyboardInterrupt traceback through importlib; now exit 130."""
    import xds_server.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["mesh", "up", DEMO]) == 130
    assert capsys.readouterr() == ("", "")


def test_a_zombie_is_not_alive() -> None:
    """A `kill -9`ed daemon and its pods stay zombies until this host's init reaps
    them (seconds): `mesh status` showed them `up` meanwhile."""
    import time

    from mesh.supervisor import pid_alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child.pid)
        assert Path(f"/proc/{child.pid}/stat").exists()  # not reaped yet: a zombie
    finally:
        child.wait(5)
    assert pid_alive(os.getpid())
