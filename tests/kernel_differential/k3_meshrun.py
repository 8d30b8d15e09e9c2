"""One run of a raw-client script in a local mesh, fast path off or on.

Owner: K3. Callers: test_delay_mesh.py, test_timeouts_mesh.py and
test_reset_mesh.py, which differ only in their mesh, policies, script and
checks; the last two share the client -> `slow` mesh (`run_slow_mesh`). The script goes out from the
client pod through tests/kernel_datapath/k2_tmo_client.py (one connection per
list, see there); the mesh is torn down even when the run fails.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from mesh.ready import fastpath_debug, wait_ready

KD = Path(__file__).resolve().parent.parent / "kernel_datapath"
CLIENT = KD / "k2_tmo_client.py"


def run_script(d: Path, name: str, mode: str, svc: str,
               script: list[list[str]], settle_s: float = 0.0) -> dict[str, Any]:
    """Bring up the mesh `d`/mesh.yaml (its policies beside it) as `name`, with
    `--fastpath MODE`; run `script` from the client pod against `svc`:9000.
    Returns {"results": the client's output, "dbg": (mode on) /debug/fastpath
    `settle_s` after the script, with the /metrics text under "metrics"}."""
    from mesh.runner import Mesh

    m = Mesh(d / "mesh.yaml", f"{name}{os.getpid() % 10000}", fastpath=mode, timeout=120)
    try:
        st = m.up()
        if mode == "on":  # a script may open 3 connections before the refill
            wait_ready(st["admin"], free=3, timeout=60.0)
        r = m.exec("client", [sys.executable, str(CLIENT), svc, "9000", json.dumps(script)],
                   capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        dbg: dict[str, Any] = {}
        if mode == "on":
            time.sleep(settle_s)
            dbg = fastpath_debug(st["admin"])
            dbg["metrics"] = urllib.request.urlopen(f"http://{st['admin']}/metrics",
                                                    timeout=5).read().decode()
    finally:
        m.down()
    return {"results": json.loads(r.stdout), "dbg": dbg}


SLOW_MESH = """\
namespace: {ns}
policies: policies.yaml
services:
  client:
    command: ["${{PYTHON}}", "{echo}", --port, "8080", --log-dir, "{logs}"]
    ports: [8080]
    calls: [slow]
  slow:
    command: ["${{PYTHON}}", "{slow}", "9000", "{logs}/slow-events.jsonl"]
    ports: [9000]
"""


def slow_req(path: str, **headers: str) -> str:
    """A GET for `slow`:9000 (k2_slow.py); `x_delay_ms="100"` sends x-delay-ms: 100."""
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: slow:9000\r\n{extra}\r\n"


def run_slow_mesh(tmp: Path, ns: str, mode: str, policies: str,
                  script: list[list[str]], settle_s: float) -> dict[str, Any]:
    """The client pod (echo_app.py) calling `slow` (k2_slow.py) in namespace `ns`
    under `policies`, `script` run by `run_script` in `tmp`/MODE; its result with
    "events": what the slow app logged (one dict per line)."""
    d = tmp / mode
    logs = d / "logs"
    logs.mkdir(parents=True)
    logs.chmod(0o777)
    (d / "mesh.yaml").write_text(SLOW_MESH.format(
        ns=ns, echo=Path(__file__).resolve().parent / "echo_app.py", logs=logs,
        slow=KD / "k2_slow.py"))
    (d / "policies.yaml").write_text(policies)
    out = run_script(d, f"{ns}{mode}", mode, "slow", script, settle_s=settle_s)
    out["events"] = [json.loads(ln) for ln in
                     (logs / "slow-events.jsonl").read_text().splitlines()]
    return out
