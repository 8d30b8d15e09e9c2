"""A policy edit the mesh refuses shows in `l7fp mesh status`, not only in daemon.log.

Found on a first day with L7FP (docs/first-day.md): a broken policies.yaml was
logged in daemon.log only; `mesh status` looked fine while the old policy kept
serving.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshtest_util import leftovers, unique_name

from mesh.runner import Mesh

pytestmark = [pytest.mark.mesh, pytest.mark.slow]

MESH = """
name: pe
policies: policies.yaml
services:
  api:
    command: ["${PYTHON}", -m, mesh.apps.social, --port, "9000"]
    ports: [9000]
"""
POLICY = "api:\n  outbound:\n    routes:\n    - match: {prefix: /}\n      route: {cluster: api}\n"


def status(name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "xds_server", "mesh", "status", "--name", name],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_for(name: str, present: bool) -> str:
    deadline = time.monotonic() + 20
    while True:
        text = status(name)
        if ("NOT applied" in text) == present or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_refused_policy_edit_is_in_status(kernel: None, tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    policy = tmp_path / "policies.yaml"
    policy.write_text(POLICY)
    name = unique_name("pe")
    m = Mesh(tmp_path / "mesh.yaml", name, sidecars="none", timeout=60)
    try:
        m.up()
        assert "NOT applied" not in status(name)
        policy.write_text(POLICY + "api: [broken\n")
        text = wait_for(name, True)
        assert f"policy: last edit NOT applied, the previous policy serves: {policy}: not valid YAML" \
            in text, text
        policy.write_text(POLICY)
        assert "NOT applied" not in wait_for(name, False)
    finally:
        m.down()
    assert leftovers(name) == []
