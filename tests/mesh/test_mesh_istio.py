"""A mesh file naming `istio_policies`: `l7fp serve --policies` generates the sidecars' config."""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtest_util import leftovers, unique_name

from mesh.runner import Mesh

pytestmark = [pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow]
HERE = Path(__file__).resolve().parent
CLIENT = str(HERE / "podclient.py")


@pytest.fixture
def istio_mesh(kernel: None) -> Iterator[Mesh]:
    m = Mesh(HERE / "istio_mesh" / "mesh.yaml", unique_name("i"), timeout=90)
    try:
        m.up()
        yield m
    finally:
        m.down()
    assert leftovers(m.name) == []


def test_subsets_split_header_route_and_authorization_policy(istio_mesh: Mesh) -> None:
    cmd = [sys.executable, CLIENT, "user", "9000", "/user", "--count", "400", "--seconds", "60"]
    rows = [json.loads(x) for x in istio_mesh.exec("client", cmd, capture_output=True, text=True,
                                                   timeout=90).stdout.splitlines()]
    by = collections.Counter(r["by"] for r in rows if r["status"] == 200)
    assert len(rows) == 400 and sum(by.values()) == 400
    assert 140 <= by["user-v1"] <= 260, by  # VirtualService 50/50 over subsets; sd 10
    cmd2 = cmd[:-4] + ["--count", "30", "--seconds", "30", "--header", "x-canary:true"]
    rows = [json.loads(x) for x in istio_mesh.exec("client", cmd2, capture_output=True, text=True,
                                                   timeout=60).stdout.splitlines()]
    assert {r["by"] for r in rows} == {"user-v2"} and len(rows) == 30
    cmd = [sys.executable, CLIENT, "user", "9000", "/admin/x", "--count", "60", "--seconds", "30"]
    rows = [json.loads(x) for x in istio_mesh.exec("client", cmd, capture_output=True, text=True,
                                                   timeout=60).stdout.splitlines()]
    seen = collections.Counter((r["status"], r["by"]) for r in rows)
    # AuthorizationPolicy DENY /admin* selects version v1 only: user-v2 still answers
    assert set(seen) == {(403, None), (200, "user-v2")}, seen
