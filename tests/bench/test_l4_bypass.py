"""sidecar-l4: the sockmap bypass really carries the app<->sidecar bytes, and leaves nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import load, topology
from benchmarks.l4bypass import L4Bypass

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_bypass_redirects_pod_local_hops_and_detaches(kernel: None, envoy_bin: str,
                                                      tmp_path: Path) -> None:
    bypass = L4Bypass()
    net = topology.BenchNet("tl4", 9, sidecars=True, envoy=envoy_bin, workdir=tmp_path,
                            concurrency=1, attach=bypass.attach)
    try:
        net.up()
        before = bypass.stats()
        for pod in ("leaf", "frontend"):
            res = load.run_wrk(net.url(pod), 2, 1, netns=net.client.netns,
                               cgroup=net.client.leaf("loadgen"))
            assert res.errors == 0 and res.requests > 20
        after = bypass.stats()
        # every request crosses app->sidecar and sidecar->app hops in the client,
        # leaf/frontend and backend pods: each must have been redirected
        assert after["redirected_msgs"] - before["redirected_msgs"] >= 2 * res.requests
        # cross-pod sidecar->sidecar traffic stays on TCP
        assert after["passed_msgs"] > before["passed_msgs"]
        assert after["sockets_added"] > 0
    finally:
        net.down()
        bypass.detach()
    assert not {n for n in netns_names() if n.startswith(f"l7fp-bench-{net.tag}-tl4")}
    assert not net.cg_root.exists()
    assert bypass.bpf is None and not bypass.cgroup_fds


def test_without_sidecars_nothing_is_intercepted(kernel: None, envoy_bin: str,
                                                 tmp_path: Path) -> None:
    net = topology.BenchNet("tnm", 8, sidecars=False, envoy=envoy_bin, workdir=tmp_path)
    try:
        net.up()
        res = load.run_wrk(net.url("frontend"), 1, 1, netns=net.client.netns,
                           cgroup=net.client.leaf("loadgen"))
        assert res.errors == 0 and net.sidecar_pids() == []
        rules = subprocess.run(["ip", "netns", "exec", net.client.netns, "iptables", "-t", "nat",
                                "-S"], capture_output=True, text=True, check=True).stdout
        assert "REDIRECT" not in rules
    finally:
        net.down()
