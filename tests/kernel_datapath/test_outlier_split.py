"""split_external_local_origin_errors on the kernel path vs a real Envoy with
the same listener and cluster (NAME=odfix).

Cluster "up" has Cilium's outlier_detection (split, consecutive_local_origin_failure
2, max_ejection_percent 100; and consecutive_gateway_failure 2 enforced); route
/t a 0.4 s timeout. Envoy counts each attempt's connection (its pool is ready)
and then a close before the answer or a timeout (the upstream answers after
1.2 s) as a local-origin failure, never as a 503/504: two closes one after the
other eject nothing (no sidecar at this loopback destination turns them into
503s), three timeouts one after the other never reach 2 (connected, failed,
connected, failed, ...), two at once do (connected, connected, failed, failed). The kernel path counts sk_msg's send
on U as the connection and the agent's timeout (504) as the failure: the same
verdicts, first through the kernel, then (the cgroup detached) through Envoy
alone. Envoy's path feeding the kernel's detector over the access log:
tests/kernel_differential/test_outlier_split_envoy.py.
"""

from __future__ import annotations

import ctypes as ct
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster
from k2_plan import load_plan, split_plan
from k2_slow import SlowServer
from test_agent import wait_for

from fastpath.agent import Agent

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CILIUM = {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
          # 2 gateway failures would eject: a close counted as a 503 would show
          "consecutive_gateway_failure": 2, "enforcing_consecutive_gateway_failure": 100,
          "max_ejection_percent": 100, "interval": "60s", "base_ejection_time": "60s"}
# n requests to /t with header argv[4], each on its own connection: one after
# the other, or all sent before any answer is read; prints their statuses
CLIENT = """
import json, socket, sys
port, n, together, hdr = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
def send(i):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /t/r{i} HTTP/1.1\\r\\nHost: svc\\r\\n{hdr}\\r\\n\\r\\n".encode())
    return s
def status(s):
    buf = b""
    while b"\\r\\n" not in buf:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    s.close()
    return int(buf.split()[1]) if buf else 0
socks = [send(i) for i in range(n)] if together else None
print(json.dumps([status(s) for s in socks] if together else [status(send(i)) for i in range(n)]))
"""


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    route = {"name": "timed", "match": {"prefix": "/t"}, "route": {"cluster": "up", "timeout": "0.4s"}}
    listener, cluster = listener_and_cluster(port, up_port, [route])
    cluster["outlier_detection"] = dict(CILIUM)
    return listener, cluster


@pytest.fixture
def slow() -> Any:
    s = SlowServer()
    yield s
    s.close()


LATE, CLOSE = "x-delay-ms: 1200", "x-close: fin"  # k2_slow: a timeout, a close before the answer


def _requests(cgroup: Any, port: int, n: int, together: bool, hdr: str = LATE) -> list[int]:
    r = cgroup.run([sys.executable, "-c", CLIENT, str(port), str(n), "1" if together else "0", hdr])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _envoy_stat(tmp_path: Path, name: str) -> int:
    cfg = json.loads((tmp_path / "envoy-split.json").read_text())
    admin = cfg["admin"]["address"]["socket_address"]["port_value"]
    url = f"http://127.0.0.1:{admin}/stats?filter=^cluster\\.up\\.outlier_detection\\.{name}$"
    return int(urllib.request.urlopen(url, timeout=5).read().decode().split(":")[1])


def _envoy_ejected(tmp_path: Path) -> int:
    return _envoy_stat(tmp_path, "ejections_enforced_total")


def _kernel_host(node: Any) -> Any:
    (slot,) = [s for _h, s in node.outlier.dets["up"].live_slots()]
    return node.outlier.dp.bpf["dp_odh"][ct.c_uint32(slot)]


def test_split_timeouts_eject_as_in_envoy(agent: Agent, cgroup: Any, slow: SlowServer,
                                          resources_envoy: EnvoyMaker, tmp_path: Path) -> None:
    tenvoy: ResourcesEnvoy = resources_envoy("split", resources, slow.port)
    node = load_plan(agent, split_plan(tenvoy.listener, tenvoy.cluster))
    (up,) = [c for c in node.plan.clusters if c.name == "up"]
    assert up.outlier is not None and up.outlier.split and up.outlier.threshold_local == 2
    seen = {}
    for path in ("kernel", "envoy"):
        if path == "envoy":
            node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy alone
        row = []
        for n, together, hdr in ((2, False, CLOSE), (3, False, LATE), (2, True, LATE)):
            if path == "kernel":
                wait_for(lambda: all(p["free"] >= 3 for p in node.pools.snapshot()))
            row.append(_requests(cgroup, tenvoy.port, n, together, hdr))
            row.append(int(_kernel_host(node).ejected) if path == "kernel" else _envoy_ejected(tmp_path))
        seen[path] = row
    print(seen)
    assert seen["kernel"] == seen["envoy"] == [[503] * 2, 0, [504] * 3, 0, [504] * 2, 1], seen
    assert node.keeper is not None and node.keeper.counts["timeout_504"] == 5  # the kernel's
    assert node.resetter.counts["reset_503"] == 2
    # both ejected the host for consecutive local-origin failures (kind 3)
    assert _kernel_host(node).kind == 3
    assert _envoy_stat(tmp_path, "ejections_enforced_consecutive_local_origin_failure") == 1
