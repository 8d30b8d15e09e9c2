"""Churn and fail-safe (K2, step 5): 10,000 short connections leave pools and
maps at rest; kill -9 of the agent under load loses at most the requests in
flight, and traffic goes on through Envoy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from k2_helpers import CLIENT
from test_agent import client_plan, wait_applied, wait_for, write_state

from fastpath import bpfsys
from fastpath.agent import Agent
from fastpath.plan import KernelPlan

pytestmark = [pytest.mark.kernel, pytest.mark.envoy, pytest.mark.slow]

LOAD = str(CLIENT.with_name("k2_load.py"))


def test_10k_short_connections_back_to_rest(kernel, cgroup, envoy, upstream, tmp_path):  # type: ignore[no-untyped-def]
    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    agent = Agent(state, access_log=False)
    agent.start()
    try:
        agent.on_plan("up", KernelPlan("up", "u1"))
        agent.on_plan("client", client_plan(envoy.port, upstream.port))
        wait_applied(agent)
        node = agent.nodes["client"]
        wait_for(lambda: all(p["free"] >= p["target"] for p in node.pools.snapshot()))
        rest = node.pools.snapshot()
        fds = len(os.listdir("/proc/self/fd"))
        r = cgroup.run([sys.executable, LOAD, "127.0.0.1", str(envoy.port), "short", "10000",
                        "150"], timeout=200)
        out = json.loads(r.stdout)
        print("CHURN", out, dict(agent.stats())["client"], node.pools.snapshot())
        for f in out.get("failed", []):  # did the app get it (an answer lost) or not?
            print("CHURN failed", f, "seen by the app:",
                  any(line.split()[1] == f["path"] for line in upstream.seen))
        assert out["errors"] == 0, out
        assert out["statuses"].get("200", 0) + out["statuses"].get("403", 0) == out["done"]
        assert out["done"] >= 2000, out  # bounded by time on a loaded machine
        stats = dict(agent.stats())["client"]
        assert stats.get(("fast", "fast", ""), 0) > 0
        # at rest again: nothing bound, pools refilled to their targets, no client
        # socket left in the map, no file descriptor leaked
        wait_for(lambda: node.bound() == set())
        wait_for(lambda: all(p["free"] == p["sockets"] == p["target"]
                             for p in node.pools.snapshot()))
        assert bpfsys.map_key_count(node.dp.fds["dp_cli"], 8) == 0
        targets = {p["pool"]: p["target"] for p in node.pools.snapshot()}
        assert set(targets) == {p["pool"] for p in rest}
        # the upstream server runs in this process: two fds per pooled connection
        grown = sum(targets.values()) - sum(p["target"] for p in rest)
        assert len(os.listdir("/proc/self/fd")) <= fds + 2 * grown + 4
    finally:
        agent.stop()


def test_kill_9_agent_under_load(kernel, cgroup, envoy, upstream, tmp_path):  # type: ignore[no-untyped-def]
    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    proc = subprocess.Popen([sys.executable, str(Path(LOAD).with_name("k2_agent_proc.py")),
                             str(state), str(envoy.port), str(upstream.port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline and proc.stdout.readline().strip() != "READY":
            assert proc.poll() is None, "agent process died"
        clients = [cgroup.popen([sys.executable, LOAD, "127.0.0.1", str(envoy.port), "keep",
                                 "100000", "6"]) for _ in range(2)]
        time.sleep(2)
        fast_before = len(upstream.seen)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        results = [json.loads(c.communicate(timeout=60)[0]) for c in clients]
        print("KILL9", results, fast_before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fast_before > 0
    for res in results:
        # at most the request in flight on that connection when the agent died
        assert res["errors"] <= 1, res
        assert res["statuses"].get("200", 0) == res["done"] - res["errors"], res
    # the kernel detached the programs with the agent's links: nothing left
    assert bpfsys.attached_prog_ids(str(cgroup.path)) == []
