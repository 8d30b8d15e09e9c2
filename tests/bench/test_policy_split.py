"""The policy-mix scenario means what it says: the project's own split agrees on the shares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sidecar
from benchmarks.meshconfig import mesh_file

REPO = Path(__file__).resolve().parents[2]


def mix_bootstrap() -> dict:
    """The sidecar bootstrap with each mix's routes pointed at a plain cluster, as in the mesh."""
    boot = sidecar.bootstrap()
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhosts = []
    for i, share in enumerate(sidecar.MIX_SHARES):
        name = sidecar.mix_service(share)
        vhosts.append({"name": name, "domains": [name],
                       "routes": sidecar.policy_routes(name, share)})
        addr = {"socket_address": {"address": f"198.18.1.{i + 2}", "port_value": 8080}}
        boot["static_resources"]["clusters"].append({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name,
                                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr}}]}]}})
    hcm["typed_config"]["route_config"]["virtual_hosts"] = vhosts
    return boot


@pytest.mark.parametrize("share", sidecar.MIX_SHARES)
def test_split_classifies_the_designed_share_as_envoy(share: float, tmp_path: Path) -> None:
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(mix_bootstrap()))
    proc = subprocess.run([sys.executable, "-m", "xds_server", "split", "--json", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    routes = [r for r in json.loads(proc.stdout)["routes"] if r["listener"] == "outbound"]
    mine = [r for r in routes if r["name"].startswith(sidecar.mix_service(share) + "-")]
    assert len(mine) == sidecar.MIX_ROUTES[share]
    envoy = {r["name"] for r in mine if r["verdict"] == "ENVOY"}
    assert envoy == {r["name"] for r in mine if r["name"].endswith("-envoy")}
    assert round(len(envoy) / len(mine), 2) == share


def test_mesh_file_passes_the_mesh_validator(tmp_path: Path) -> None:
    import yaml

    from mesh import spec

    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(mesh_file("bench-t")))
    parsed = spec.load(path)
    assert set(parsed.services) == {"client", "leaf", "frontend", "backend",
                                    "mix0", "mix11", "mix50"}
    assert parsed.policies["mix11"]["outbound"]["routes"][-1]["name"] == "mix11-r8-envoy"


def test_kernel_share_counters_from_the_fast_path_metric() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from benchmarks.meshconfig import parse_fastpath_metrics

    reg = CollectorRegistry()
    c = Counter("l7fp_fastpath_requests", "x", ["node", "route", "outcome", "reason"],
                registry=reg)
    c.labels("n1", "r1", "fast", "").inc(70)
    c.labels("n1", "r2", "kernel_reply", "").inc(10)
    c.labels("n2", "r3", "envoy", "punt").inc(20)
    text = generate_latest(reg).decode() + "other_metric_total 5\n"
    assert parse_fastpath_metrics(text) == {"requests": 100, "kernel_requests": 80}


def test_demo_mesh_file_with_client_passes_the_mesh_validator(tmp_path: Path) -> None:
    import yaml

    from benchmarks.meshconfig import demo_mesh_file
    from mesh import spec

    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_mesh_file("bench-d")))
    parsed = spec.load(path)
    assert "client" in parsed.services and "frontend" in parsed.services
    assert parsed.services["client"].calls == ("frontend",)
    assert parsed.policies  # the demo's own policy file came along
