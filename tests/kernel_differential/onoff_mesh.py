"""One run of a request driver in a local mesh, fast path off or on, for the
on/off comparisons whose mesh files name their app and log folder.

Owner: K3. Callers: tests/kernel_mirror/test_mirror_onoff.py and
tests/kernel_retry/test_retry_onoff.py, which differ in their app, their
readiness wait and what they read afterwards. The mesh is torn down even when
the run fails; its control-plane log, the results and /debug/fastpath are kept
in the run's folder for a failure's investigation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_fastpath_onoff import fastpath_counts


def prepare(src: Path, d: Path, mesh_file: str, policies: str, app: str) -> Path:
    """`d`/mesh.yaml from `src`/`mesh_file` with @APP@ (`src`/`app`) and @LOGDIR@
    filled in, `policies` (a file or a folder) copied beside it; the log folder
    (writable by the pods)."""
    logdir = d / "logs"
    logdir.mkdir(parents=True)
    logdir.chmod(0o777)
    text = (src / mesh_file).read_text().replace("@APP@", str(src / app))
    (d / "mesh.yaml").write_text(text.replace("@LOGDIR@", str(logdir)))
    if (src / policies).is_dir():
        shutil.copytree(src / policies, d / policies)
    else:
        (d / policies).write_text((src / policies).read_text())
    return logdir


def run_driver(d: Path, name: str, mode: str, driver: Path, reqs: list[dict[str, Any]],
               gap_ms: int, ready: Callable[[str], None],
               settle: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Bring up `d`/mesh.yaml as `name` with `--fastpath MODE` (mode on: `ready`
    (admin address) waits for the agent), send `reqs` from the client pod with
    `driver` (`gap_ms` apart, mode on only), then `settle()`. Returns "st" (the
    mesh's state), "results", and mode on: "counts" and "dbg"."""
    from mesh.runner import Mesh

    m = Mesh(d / "mesh.yaml", f"{name}{os.getpid() % 10000}", fastpath=mode, timeout=120)
    try:
        st = m.up()
        if mode == "on":
            ready(st["admin"])
        (d / "reqs.json").write_text(json.dumps(reqs))
        r = m.exec("client", [sys.executable, str(driver), str(d / "reqs.json"),
                              str(gap_ms if mode == "on" else 0)],
                   capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
        settle()
        counts = fastpath_counts(st["admin"]) if mode == "on" else Counter()
        dbg = json.loads(urllib.request.urlopen(f"http://{st['admin']}/debug/fastpath",
                                                timeout=5).read()) if mode == "on" else {}
        (d / "results.json").write_text(json.dumps(results))
        (d / "debug.json").write_text(json.dumps(dbg))
    finally:
        cp_log = Path(m.state_file).parent / "logs" / "control-plane.log"
        if cp_log.exists():  # for a failure's investigation
            (d / "control-plane.log").write_bytes(cp_log.read_bytes())
        m.down()
    return {"st": st, "results": results, "counts": counts, "dbg": dbg}
