"""The sidecar bootstrap is valid for the real Envoy; the policy mix has the designed shares."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import sidecar


@pytest.mark.parametrize("share,routes,count", [(0.0, 8, 0), (0.11, 9, 1), (0.5, 8, 4)])
def test_envoy_only_share(share: float, routes: int, count: int) -> None:
    assert sidecar.MIX_ROUTES[share] == routes
    idx = sidecar.envoy_only_indexes(routes, share)
    assert len(idx) == count and all(0 <= i < routes for i in idx)
    assert round(count / routes, 2) == share


def test_route_tables_per_mix_service() -> None:
    for share in sidecar.MIX_SHARES:
        table = sidecar.policy_routes("c", share)
        assert len(table) == sidecar.MIX_ROUTES[share]
        envoy = [r["name"] for r in table if r["name"].endswith("-envoy")]
        assert len(envoy) == len(sidecar.envoy_only_indexes(len(table), share))
    vhosts = sidecar.outbound_vhosts({0.0: "198.18.1.6", 0.5: "198.18.1.8"})
    assert vhosts[0]["domains"] == ["198.18.1.6:8080", "198.18.1.6"]
    assert vhosts[-1]["domains"] == ["*"]


@pytest.mark.envoy
def test_bootstrap_validates_in_real_envoy(envoy_bin: str, tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(sidecar.bootstrap({sh: f"198.18.1.{i + 6}"
                                                 for i, sh in enumerate(sidecar.MIX_SHARES)})))
    proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
