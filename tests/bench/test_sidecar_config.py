"""The sidecar bootstrap is valid for the real Envoy; the policy mix has the designed shares."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import sidecar


@pytest.mark.parametrize("share,count", [(0.0, 0), (0.11, 2), (0.5, 9)])
def test_envoy_only_share(share: float, count: int) -> None:
    idx = sidecar.envoy_only_indexes(sidecar.MIX_ROUTES, share)
    assert len(idx) == count and all(0 <= i < sidecar.MIX_ROUTES for i in idx)


def test_route_table_order_and_names() -> None:
    table = sidecar.policy_routes("c")
    assert len(table) == len(sidecar.MIX_SHARES) * sidecar.MIX_ROUTES + 1
    assert table[-1]["match"] == {"prefix": "/"}
    envoy = [r["name"] for r in table if r["name"].endswith("-envoy")]
    assert len(envoy) == 0 + 2 + 9 and all(n.startswith(("mix11", "mix50")) for n in envoy)


@pytest.mark.envoy
def test_bootstrap_validates_in_real_envoy(envoy_bin: str, tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(sidecar.bootstrap()))
    proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
