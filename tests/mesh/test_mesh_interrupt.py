"""`l7fp mesh up` interrupted while the mesh starts: nothing may be left behind.

Found on a first day with L7FP (docs/first-day.md): Ctrl-C during `mesh up`
returned 130 but left the mesh daemon building the mesh; the daemon then died
on the closed pipe when it wrote READY, leaving namespaces, links, iptables
rules and the cgroup for `mesh down` to find.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshtest_util import leftovers, unique_name

from mesh import teardown

pytestmark = [pytest.mark.mesh, pytest.mark.slow]

# An app that never listens: `mesh up` waits for it until interrupted.
NEVER_READY = """
name: never
services:
  idle:
    command: ["${PYTHON}", -c, "import time; time.sleep(300)"]
    ports: [9000]
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_up_removes_everything(kernel: None, tmp_path: Path, sig: int) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(NEVER_READY)
    name = unique_name("i" + str(int(sig)))
    argv = [sys.executable, "-m", "xds_server", "mesh", "up", str(path), "--name", name,
            "--sidecars", "none", "--timeout", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (teardown.state_dir(name) / "logs").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the daemon is waiting for the app now
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=45)
        assert proc.returncode == 130, err
        assert "mesh up interrupted: the mesh was stopped and removed" in err
        assert "Traceback" not in err
        assert leftovers(name) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        teardown.down(name)


def test_not_ready_names_the_logs_that_are_kept(kernel: None, tmp_path: Path) -> None:
    """The error named the run's log directory, which the teardown had just removed."""
    path = tmp_path / "mesh.yaml"
    path.write_text(NEVER_READY)
    name = unique_name("nr")
    kept = Path(f"/tmp/l7fp-mesh-{name}-failed")
    try:
        r = subprocess.run([sys.executable, "-m", "xds_server", "mesh", "up", str(path), "--name", name,
                            "--sidecars", "none", "--timeout", "3"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1
        assert r.stderr.strip() == f"l7fp mesh: not ready after 3s: ['idle-0'] (logs kept in {kept})"
        assert (kept / "logs" / "idle-0.app.log").exists()
        assert leftovers(name) == []
    finally:
        teardown.down(name)
        shutil.rmtree(kept, ignore_errors=True)
