"""split_external_local_origin_errors on the kernel path vs a real Envoy with
the same listener and cluster (NAME=odfix).

Cluster "up" has Cilium's outlier_detection (split, consecutive_local_origin_failure
2, max_ejection_percent 100); route /t a 0.4 s timeout, the upstream answers
after 1.2 s. Envoy counts each attempt's connection (its pool is ready) and then
the timeout as a local-origin failure: three requests one after the other
never reach 2 (connected, failed, connected, failed, ...), two at once do
(connected, connected, failed, failed). The kernel path counts sk_msg's send
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
          "max_ejection_percent": 100, "interval": "60s",
          "base_ejection_time": "60s"}
# n requests to /t, each on its own connection: one after the other, or all
# sent before any answer is read; prints their statuses
CLIENT = """
import json, socket, sys
port, n, together = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
def send(i):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /t/late{i} HTTP/1.1\\r\\nHost: svc\\r\\nx-delay-ms: 1200\\r\\n\\r\\n".encode())
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


def _requests(cgroup: Any, port: int, n: int, together: bool) -> list[int]:
    r = cgroup.run([sys.executable, "-c", CLIENT, str(port), str(n), "1" if together else "0"])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _envoy_ejected(tmp_path: Path) -> int:
    cfg = json.loads((tmp_path / "envoy-split.json").read_text())
    admin = cfg["admin"]["address"]["socket_address"]["port_value"]
    url = (f"http://127.0.0.1:{admin}/stats?filter=^cluster\\.up\\.outlier_detection\\."
           "ejections_enforced_consecutive_local_origin_failure$")
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return int(body.split(":")[1])


def _kernel_ejected(node: Any) -> int:
    (slot,) = [s for _h, s in node.outlier.dets["up"].live_slots()]
    h = node.outlier.dp.bpf["dp_odh"][ct.c_uint32(slot)]
    return int(h.ejected and h.kind == 3)


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
        one_by_one = _requests(cgroup, tenvoy.port, 3, together=False)
        after_seq = _kernel_ejected(node) if path == "kernel" else _envoy_ejected(tmp_path)
        if path == "kernel":
            wait_for(lambda: all(p["free"] >= 3 for p in node.pools.snapshot()))
        both = _requests(cgroup, tenvoy.port, 2, together=True)
        after_two = _kernel_ejected(node) if path == "kernel" else _envoy_ejected(tmp_path)
        seen[path] = (one_by_one, after_seq, both, after_two)
    print(seen)
    assert seen["kernel"] == seen["envoy"] == ([504] * 3, 0, [504] * 2, 1), seen
    assert node.keeper is not None and node.keeper.counts["timeout_504"] == 5  # the kernel's
