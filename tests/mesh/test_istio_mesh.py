"""A mesh file naming `istio_policies`: `l7fp serve --policies` generates the sidecars' config."""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.runner import Mesh

from .conftest import leftovers, unique_name

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


def test_virtual_service_split_and_authorization_policy(istio_mesh: Mesh) -> None:
    cmd = [sys.executable, CLIENT, "user", "9000", "/user", "--count", "400", "--seconds", "60"]
    rows = [json.loads(x) for x in istio_mesh.exec("client", cmd, capture_output=True, text=True,
                                                   timeout=90).stdout.splitlines()]
    by = collections.Counter(r["by"] for r in rows if r["status"] == 200)
    assert len(rows) == 400 and sum(by.values()) == 400
    assert 140 <= by["user"] <= 260, by  # VirtualService 50/50; sd 10
    cmd = [sys.executable, CLIENT, "user", "9000", "/admin/x", "--count", "60", "--seconds", "30"]
    rows = [json.loads(x) for x in istio_mesh.exec("client", cmd, capture_output=True, text=True,
                                                   timeout=60).stdout.splitlines()]
    seen = collections.Counter((r["status"], r["by"]) for r in rows)
    # AuthorizationPolicy DENY /admin* selects app=user only: user-v2 still answers
    assert set(seen) == {(403, None), (200, "user-v2")}, seen
