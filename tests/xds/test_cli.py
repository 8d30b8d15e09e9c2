"""`l7fp bootstrap`, `l7fp serve --help` and the interim `l7fp demo`, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from xds_server.node import parse_istio_id

from .conftest import REPO

ISTIO_ID = "sidecar~198.18.0.2~frontend-0.demo~demo.svc.cluster.local"


def l7fp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xds_server", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_istio_node_id_parsed():
    assert parse_istio_id(ISTIO_ID) == {"type": "sidecar", "ip": "198.18.0.2", "pod": "frontend-0",
                                        "namespace": "demo", "domain": "demo.svc.cluster.local"}
    assert parse_istio_id("plain-node") == {}


def test_bootstrap_yaml_and_errors():
    out = l7fp("bootstrap", "--node-id", ISTIO_ID, "--xds", "127.0.0.1:15999", "--delta", "--admin-port", "15123")
    assert out.returncode == 0, out.stderr
    b = yaml.safe_load(out.stdout)
    assert b["node"] == {"id": ISTIO_ID, "cluster": "frontend.demo"}
    assert b["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert b["admin"]["address"]["socket_address"]["port_value"] == 15123
    bad = l7fp("bootstrap", "--node-id", "x", "--xds", "nohostport")
    assert bad.returncode == 2 and "--xds 'nohostport': expected HOST:PORT" in bad.stderr
    assert "--fastpath" in l7fp("serve", "--help").stdout


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [[], ["--delta"]], ids=["sotw", "delta"])
def test_bootstrap_validates_with_real_envoy(envoy_bin, tmp_path, delta):
    out = l7fp("bootstrap", "--node-id", "n1", "--json", *delta)
    path = tmp_path / "b.json"
    path.write_text(out.stdout)
    v = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.envoy
def test_demo_end_to_end(envoy_bin):
    # Other tests (and other meshes on a shared machine) may run Envoys of their
    # own: only an Envoy that the demo started and left behind is a leak.
    before = set(_envoy_pids())
    out = subprocess.run([sys.executable, "-m", "xds_server.demo", "--requests", "2"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "admin-denied          2  403x2" in out.stdout
    assert "api                   4  200x4" in out.stdout
    assert "demo done" in out.stdout
    # the demo's Envoys were its children: one it left behind is an orphan now
    # (other tests' Envoys, started meanwhile, still have their live parent)
    assert [pid for pid in set(_envoy_pids()) - before if _ppid(pid) == 1] == []


def _envoy_pids() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "l7fp-envoy-"], capture_output=True, text=True)
    return out.stdout.split()


def _ppid(pid: str) -> int:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return 0  # gone
    return int(stat.rsplit(")", 1)[1].split()[1])
