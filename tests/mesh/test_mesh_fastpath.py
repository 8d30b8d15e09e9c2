"""The seam to the fast path: `l7fp mesh up --fastpath on` passes the flag and the
state file to `l7fp serve`, and the generated config is one the agent offloads."""

from __future__ import annotations

import collections
import json
import re
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtest_util import leftovers, unique_name

from mesh.ready import wait_ready
from mesh.runner import Mesh

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow]
CLIENT = str(Path(__file__).with_name("podclient.py"))
MESH = """
name: fpm
services:
  client:
    command: ["${PYTHON}", -m, mesh.apps.social, --port, "8080"]
    ports: [8080]
  user:
    command: ["${PYTHON}", -m, mesh.apps.social, --service, user, --port, "9000"]
    ports: [9000]
"""


@pytest.fixture
def fast_mesh(kernel: None, tmp_path: Path) -> Iterator[Mesh]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    m = Mesh(tmp_path / "mesh.yaml", unique_name("k"), fastpath="on", timeout=120)
    try:
        m.up()
        yield m
    finally:
        m.down()
    assert leftovers(m.name) == []


def fast_count(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(v)) for v in re.findall(
        r'^l7fp_fastpath_requests_total\{[^}]*outcome="fast"[^}]*\} (\S+)$', text, re.M))


def test_requests_take_the_kernel_fast_path(fast_mesh: Mesh) -> None:
    st = fast_mesh.state()
    assert st["fastpath"] == "on"
    cmd = [sys.executable, CLIENT, "user", "9000", "/u", "--count", "300", "--seconds", "60"]
    # The agent applies the plans after the sidecars connect: a BCC compile per
    # node, 10-20 s on a loaded 2-core machine. The client's one keep-alive
    # connection stays with Envoy if its first request misses: wait first.
    wait_ready(st["admin"], timeout=90)
    before = fast_count(st["admin"])
    out = fast_mesh.exec("client", cmd, capture_output=True, text=True, timeout=90).stdout
    rows = [json.loads(x) for x in out.splitlines()]
    assert collections.Counter((r["status"], r["by"]) for r in rows) == {(200, "user"): 300}
    assert fast_count(st["admin"]) - before >= 250
