"""The agent half of outlier detection (fastpath/agent_outlier.py) over the
real kernel maps of a datapath module compiled with -DDP_OUTLIER=1 (nothing
attached: the agent's changes run as dp_od_ops with BPF_PROG_TEST_RUN): the
answers the agent makes itself (a close's 503, a timeout's 504) counted and
ejecting by the kernel's own rule, the merge window of the LB's view,
unejection at the tick, the retry agent's view, and a kernel ejection that the
agent's ops never undo. The response path is tested against the real Envoy in
tests/kernel_differential/test_outlier_mesh.py."""

from __future__ import annotations

import ctypes as ct
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from fastpath import agent_outlier, loader
from fastpath.agent_outlier import OutlierKeeper
from fastpath.agent_reset import PeerVal
from fastpath.outlier import OutlierConfig
from fastpath.plan import Cluster, Endpoint, KernelPlan, LbPolicy
from tests.support.env import require_kernel

pytestmark = pytest.mark.kernel
MS = 1_000_000


@pytest.fixture(scope="module")
def module(kernel_once: None) -> Any:
    """One compiled datapath module for the file (its maps zeroed per test)."""
    return loader.compile_module(loader.module_text(), ("-DDP_OUTLIER=1",), instance="odfix-unit")


@pytest.fixture
def bpf(module: Any) -> Iterator[Any]:
    for name in ("dp_odc", "dp_odd", "dp_odh", "dp_peer"):
        module[name].clear()
    yield module


@pytest.fixture(scope="module")
def kernel_once() -> None:
    require_kernel()


def keeper(bpf: Any, cfg: OutlierConfig) -> OutlierKeeper:
    k = OutlierKeeper(SimpleNamespace(bpf=bpf))
    c = Cluster("c", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.2", 80), Endpoint("198.18.0.3", 80)),
                outlier=cfg, eds_name="outbound|80||c")
    sp = SimpleNamespace(cluster_ids={"c": 0}, no_healthy={})
    k.program(KernelPlan("n", "1", (), (c,)), sp, 0, lambda cl: list(cl.endpoints),
              {(0, 0): 7, (0, 1): 8})
    return k


def clock(monkeypatch: Any) -> list[int]:
    """The agent's clock, from the kernel's (bpf_ktime_get_ns: CLOCK_MONOTONIC) on."""
    now = [time.monotonic_ns()]
    monkeypatch.setattr(agent_outlier.time, "monotonic_ns", lambda: now[0])
    return now


def bind(bpf: Any, up: int, slot: int) -> None:
    t = bpf["dp_peer"]
    t[t.Key(up)] = PeerVal(1, 1, 0, slot + 1)


def test_program_writes_the_cluster_and_detector(bpf: Any) -> None:
    keeper(bpf, OutlierConfig(threshold_5xx=3, max_percent=50, panic_percent=0.0))
    rec = bpf["dp_odc"][ct.c_uint32(0)]
    assert (rec.det, rec.n, rec.rr, rec.host[0], rec.host[1]) == (1, 2, 1, 0, 1)
    det = bpf["dp_odd"][ct.c_uint32(0)]
    assert (det.total, det.room, det.panic, det.window_ns) == (2, 1, 0, 1000 * MS)
    assert bpf["dp_odh"][ct.c_uint32(1)].t5xx == 3


def test_agent_answers_count_and_eject_then_tick_brings_back(monkeypatch: Any, bpf: Any) -> None:
    now = clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=3, threshold_gateway=0, interval_ms=500,
                                  base_ms=1000, max_percent=50))
    bind(bpf, 42, 1)
    k.count_error(42, 503)  # a close before the response: the destination sidecar's 503
    k.count_error(42, 504)  # a timeout
    assert not bpf["dp_odh"][ct.c_uint32(1)].ejected
    k.count_error(42, 503)
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert h.ejected and h.lb_out and h.c5xx == 0  # out of the merge window: the LB at once
    det = bpf["dp_odd"][ct.c_uint32(0)]
    assert (det.ejected, det.lb_out, det.room) == (1, 1, 0)
    assert k.healthy_pools(0, 0, [7, 8]) == [7]  # the retry agent skips it too
    bind(bpf, 43, 0)
    for _ in range(3):
        k.count_error(43, 500)  # max_ejection_percent 50 of 2: no room for a second
    assert not bpf["dp_odh"][ct.c_uint32(0)].ejected
    assert bpf["dp_odh"][ct.c_uint32(0)].overflow == 1
    now[0] += 600 * MS
    k.service(now[0])  # notices the ejection; the first tick (0.5 s) is too early
    assert k.debug()["c"]["active"] == 1
    now[0] += 600 * MS
    k.service(now[0])  # 1.2 s later: back at the tick; the LB's view 1.2 s after the last
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert not h.ejected and not h.lb_out and k.debug()["c"]["unejections"] == 1


def test_unejection_within_the_merge_window_is_delivered_later(monkeypatch: Any, bpf: Any) -> None:
    now = clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=1, interval_ms=100, base_ms=100,
                                  max_percent=100, merge_window_ms=1000))
    bind(bpf, 42, 0)
    k.count_error(42, 500)  # ejected and delivered now (last delivery: never)
    now[0] += 200 * MS
    k.service(now[0])  # unejected at the tick, but the LB got a change 0.2 s ago: merged
    h = bpf["dp_odh"][ct.c_uint32(0)]
    assert not h.ejected and h.lb_out
    assert bpf["dp_odd"][ct.c_uint32(0)].pending
    now[0] += 900 * MS
    k.service(now[0])  # 0.9 s after the unejection: still merged
    assert bpf["dp_odh"][ct.c_uint32(0)].lb_out
    now[0] += 150 * MS
    k.service(now[0])  # the window (1 s from the unejection) ended: delivered
    assert not bpf["dp_odh"][ct.c_uint32(0)].lb_out
    assert not bpf["dp_odd"][ct.c_uint32(0)].pending


def test_panic_keeps_every_pool_for_the_retry_agent(monkeypatch: Any, bpf: Any) -> None:
    clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=1, max_percent=100, panic_percent=50.0,
                                  merge_window_ms=0))
    bind(bpf, 42, 0)
    k.count_error(42, 502)
    assert k.healthy_pools(0, 0, [7, 8]) == [8]  # 1 of 2 healthy: 50 %, no panic
    bind(bpf, 43, 1)
    k.count_error(43, 502)
    assert k.healthy_pools(0, 0, [7, 8]) == [7, 8]  # none healthy: panic, every host


def test_lb_view_published_on_change_only(monkeypatch: Any, bpf: Any) -> None:
    """The kernel's LB view (hosts with lb_out) goes to Envoy's EDS: one
    on_lb_change per change, none while unchanged, at most one per 20 ms."""
    now = clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=1, interval_ms=100, base_ms=100,
                                  max_percent=100, merge_window_ms=0))
    pushes: list[dict[str, frozenset[str]]] = []
    k.on_lb_change = lambda: pushes.append(k.lb_view)
    now[0] += 20 * MS
    k.service(now[0])
    assert pushes == [{"c": frozenset()}]  # the first view (nothing out)
    bind(bpf, 42, 1)
    k.count_error(42, 500)  # ejected, delivered at once (no merge window)
    now[0] += 10 * MS
    k.service(now[0])  # 10 ms after the last push: waits
    assert len(pushes) == 1
    now[0] += 10 * MS
    k.service(now[0])
    assert pushes[-1] == {"c": frozenset({"198.18.0.3:80"})}
    now[0] += 30 * MS
    k.service(now[0])
    assert len(pushes) == 2  # unchanged: no push
    now[0] += 100 * MS
    k.service(now[0])  # unejected at the tick
    assert pushes[-1] == {"c": frozenset()} and k.debug()["c"]["eds_unhealthy"] == []


def test_envoy_responses_count_with_the_kernels(monkeypatch: Any, bpf: Any) -> None:
    """Responses Envoy got (ALS) go into the same host counters: a success
    zeroes them, 3 errors in a row eject; other clusters and hosts are ignored."""
    clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=3, max_percent=50))
    bad = "198.18.0.3:80"
    k.count_envoy([("c", bad, 500), ("c", bad, 503), ("c", bad, 200), ("other", bad, 500),
                   ("c", "198.18.0.9:80", 500)])
    assert bpf["dp_odh"][ct.c_uint32(1)].c5xx == 0  # queued: counted by service()
    k.service()
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert (h.c5xx, h.cgw, h.ejected) == (0, 0, 0)
    bind(bpf, 42, 1)
    k.count_error(42, 504)  # a kernel-path error (the agent's 504), then two of Envoy's
    k.count_envoy([("c", bad, 500), ("c", bad, 502)])
    k.service()
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert h.ejected and h.lb_out and k.envoy_counted == 5


def test_a_cluster_that_left_the_plan_is_not_counted_or_published(monkeypatch: Any, bpf: Any) -> None:
    """After a plan without `c` (ENVOY now, or gone), Envoy's own detector has
    it back: its observations are dropped and its hosts leave the LB view."""
    now = clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=1, interval_ms=10_000, max_percent=100,
                                  merge_window_ms=0))
    pushes: list[dict[str, frozenset[str]]] = []
    k.on_lb_change = lambda: pushes.append(k.lb_view)
    k.count_envoy([("c", "198.18.0.3:80", 500)])
    now[0] += 20 * MS
    k.service(now[0])
    assert pushes[-1] == {"c": frozenset({"198.18.0.3:80"})} and k.owned == {"c"}
    assert k.cla_names == {"c": "outbound|80||c"}  # what the server's EDS overlay keys by
    sp = SimpleNamespace(cluster_ids={}, no_healthy={})
    k.program(KernelPlan("n", "2", (), ()), sp, 1, lambda cl: list(cl.endpoints), {})
    assert k.owned == frozenset()
    k.count_envoy([("c", "198.18.0.2:80", 500)])
    now[0] += 20 * MS
    k.service(now[0])
    assert not bpf["dp_odh"][ct.c_uint32(0)].ejected  # not counted
    assert pushes[-1] == {} and k.debug() == {} and k.counts() == {}
