"""Bookinfo-style Istio policies on the local mesh (real pods, iptables, Envoy sidecars).

The mesh file's `istio_policies:` makes the mesh's control plane `l7fp serve
--policies`; requests go from the productpage pod through its sidecar
(istio-iptables interception) to the other pods' sidecars, as in Istio.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow]
HERE = Path(__file__).parent
PODREQ = HERE / "podreq.py"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from support.env import require_kernel

    require_kernel()
    from mesh.runner import Mesh

    m = Mesh(HERE / "bookinfo-mesh" / "mesh.yaml", f"ib{os.getpid() % 100000}", timeout=120,
             fastpath=os.environ.get("L7FP_ISTIO_FASTPATH", "off"))
    try:
        m.up()
        yield m
    finally:
        m.down()


def requests(mesh: object, url: str, count: int, *args: str) -> list[dict]:
    r = mesh.exec("productpage", [sys.executable, str(PODREQ), url, str(count), *args],  # type: ignore[attr-defined]
                  capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_header_match_sends_jason_to_v2(mesh: object) -> None:
    rows = requests(mesh, "http://reviews:9080/r", 20, "--header", "end-user:jason")
    assert Counter((r["status"], r["pod"]) for r in rows) == Counter({(200, "reviews-1"): 20})


def test_weighted_subsets_80_20(mesh: object) -> None:
    rows = requests(mesh, "http://reviews:9080/r", 200)
    seen = Counter(r["pod"] for r in rows if r["status"] == 200)
    assert sum(seen.values()) == 200 and set(seen) == {"reviews-0", "reviews-2"}, seen
    # Binomial(200, 0.2): mean 40, sd 5.7; +-4.5 sd.
    assert 15 <= seen["reviews-2"] <= 65, seen


def test_fault_abort_for_jason(mesh: object) -> None:
    jason = requests(mesh, "http://ratings:9080/x", 5, "--header", "end-user:jason")
    assert {(r["status"], r["body"]) for r in jason} == {(500, "fault filter abort")}
    others = requests(mesh, "http://ratings:9080/x", 5)
    assert {(r["status"], r["pod"]) for r in others} == {(200, "ratings-0")}


def test_authorization_policy(mesh: object) -> None:
    assert {r["status"] for r in requests(mesh, "http://details:9080/details/1", 3)} == {200}
    assert {r["status"] for r in requests(mesh, "http://details:9080/details/1", 3,
                                          "--method", "POST")} == {403}
    denied = requests(mesh, "http://details:9080/details/admin", 3)
    assert {(r["status"], r["body"]) for r in denied} == {(403, "RBAC: access denied")}
