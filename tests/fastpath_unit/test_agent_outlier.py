"""The agent half of outlier detection (fastpath/agent_outlier.py) over the
real kernel maps of a datapath module compiled with -DDP_OUTLIER=1 (nothing
attached: the agent's changes run as dp_od_ops with BPF_PROG_TEST_RUN): the
answers the agent makes itself (a close's 503, a timeout's 504) counted and
ejecting by the kernel's own rule, the merge window of the LB's view (and
the kernel's merge rule against `outlier.merge` over generated times),
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import agent_outlier, loader, outlier
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
    assert (det.total, det.allowed, det.panic, det.window_ns) == (2, 1, 0, 1000 * MS)
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
    assert (det.ejected, det.lb_out, det.allowed) == (1, 1, 1)
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


class _Racing:
    """The module's maps as the agent sees them, with a kernel ejection of
    slot `slot` (the response path's dp_outlier_status, as another CPU would
    run it) injected right before the agent's `at`-th map access or op run."""

    def __init__(self, bpf: Any, at: int, slot: int) -> None:
        self.bpf, self.at, self.slot, self.seen, self.fired = bpf, at, slot, 0, False
        self.fd = bpf.load_func("dp_od_ops", type(bpf).XDP).fd

    def hit(self) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.fired = True
            ops = (agent_outlier.OdOp * 1)(agent_outlier.OdOp(agent_outlier.OP_STATUS, self.slot, 0, 0, 500))
            _real_prog_test_run(self.fd, ops)

    def run(self, fd: int, data: Any) -> Any:
        """bpfsys.prog_test_run of the agent's ops."""
        self.hit()
        return _real_prog_test_run(fd, data)

    def __getitem__(self, name: str) -> Any:
        return _RacingTable(self, self.bpf[name])

    def load_func(self, *a: Any) -> Any:
        return self.bpf.load_func(*a)


class _RacingTable:
    def __init__(self, race: _Racing, table: Any) -> None:
        self.race, self.table = race, table

    def __getitem__(self, k: Any) -> Any:
        self.race.hit()
        return self.table[k]

    def __setitem__(self, k: Any, v: Any) -> None:
        self.race.hit()
        self.table[k] = v


_real_prog_test_run = agent_outlier.bpfsys.prog_test_run


def _consistent(bpf: Any, slots: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The detector's counts agree with its hosts' flags: (ejected, lb_out, pending, sum)."""
    det = bpf["dp_odd"][ct.c_uint32(0)]
    hosts = [bpf["dp_odh"][ct.c_uint32(s)] for s in slots]
    assert int(det.ejected) == sum(int(h.ejected) for h in hosts)
    assert int(det.lb_out) == sum(int(h.lb_out) for h in hosts)
    return int(det.ejected), int(det.lb_out), int(det.pending), len(hosts)


def test_a_kernel_ejection_during_the_agents_tick_is_never_lost(monkeypatch: Any, bpf: Any) -> None:
    """Host A is unejected at a tick within the merge window (a merged
    update); the kernel ejects host B at every point of that tick in turn
    (before each map access or op run of the agent). B's ejection must stay
    counted in the detector (its `ejected`, so max_ejection_percent holds)
    and reach the LB's view, at once or by the merged update. The agent's
    read-modify-write of dp_odd (before ops for it) lost it when the kernel
    came between the read and the write."""
    points = 0
    for at in range(1, 40):
        for name in ("dp_odc", "dp_odd", "dp_odh", "dp_peer"):
            bpf[name].clear()
        now = clock(monkeypatch)
        now[0] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # (monotonic_ns is faked)
        k = keeper(bpf, OutlierConfig(threshold_5xx=1, interval_ms=100, base_ms=100,
                                      max_percent=100, merge_window_ms=1000))
        bind(bpf, 42, 0)
        k.count_error(42, 500)  # A out, delivered at once
        time.sleep(0.12)  # real time: B's ejection (kernel clock) is not due at this tick, A's is
        now[0] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 30 * MS
        race = _Racing(bpf, at, 1)
        k.dp = SimpleNamespace(bpf=race)
        monkeypatch.setattr(agent_outlier.bpfsys, "prog_test_run", race.run)
        k.service(now[0])  # A back (merged: 150 ms after the last delivery); B ejected meanwhile
        monkeypatch.setattr(agent_outlier.bpfsys, "prog_test_run", _real_prog_test_run)
        k.dp = SimpleNamespace(bpf=bpf)
        if not race.fired:
            break
        points += 1
        ejected, lb_out, pending, _n = _consistent(bpf, (0, 1))
        b = bpf["dp_odh"][ct.c_uint32(1)]
        assert ejected == 1 and b.ejected, at
        assert b.lb_out or pending, at  # in the LB's view now, or by the merged update
        now[0] += 1100 * MS  # the merged update's window ended (before B's own tick, which
        k._deliver(k.dets["c"], agent_outlier.OP_DUE, now[0])  # would bring it back)
        _consistent(bpf, (0, 1))
        a = bpf["dp_odh"][ct.c_uint32(0)]
        assert (int(a.lb_out), int(bpf["dp_odh"][ct.c_uint32(1)].lb_out)) == (0, 1), at
    assert points >= 3  # the tick touched the maps at least this often


def test_split_local_origin_failures_count_apart_from_statuses(monkeypatch: Any, bpf: Any) -> None:
    """split_external_local_origin_errors (Cilium's: consecutive_local_origin_failure
    2): the agent's timeouts and Envoy's connect failures count as local-origin
    failures, never as 5xx; an attempt that got its connection zeroes them
    (sk_msg's send, the retry agent's attempt, an Envoy entry with a status
    or a timeout after connecting); 5xx statuses count on their own."""
    clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=3, max_percent=100, split=True, threshold_local=2))
    assert bpf["dp_odh"][ct.c_uint32(1)].tlo == 2 and k.split_slots == {0, 1}
    bind(bpf, 42, 1)
    bad = "198.18.0.3:80"
    k.count_error(42, 500)  # a reset's 503 stays a status (the destination sidecar's, in the mesh)
    k.count_envoy([("c", bad, 500)])  # connected, then a 500
    k.service()
    k.count_error(42, 504)  # a timeout: local origin, not a third 5xx
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert (h.c5xx, h.clo, h.ejected) == (2, 1, 0)
    assert k.attempt(0, 0, 8) == 2  # the retry agent's attempt on host 1: connected
    assert bpf["dp_odh"][ct.c_uint32(1)].clo == 0
    k.count_envoy([("c", bad, outlier.LOCAL_TIMEOUT)])  # connected, then timed out: 1
    k.count_envoy([("c", bad, outlier.LOCAL_CONNECT_FAILED)])  # no connection: 2, ejected
    k.service()
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert (h.ejected, h.kind, h.c5xx) == (1, 3, 2)


def test_without_split_local_origin_events_are_statuses(monkeypatch: Any, bpf: Any) -> None:
    clock(monkeypatch)
    k = keeper(bpf, OutlierConfig(threshold_5xx=3, max_percent=100))
    bad = "198.18.0.3:80"
    k.count_envoy([("c", bad, outlier.LOCAL_CONNECT_FAILED), ("c", bad, outlier.LOCAL_RESET),
                   ("c", bad, outlier.LOCAL_TIMEOUT)])  # 503, 503, 504: three 5xx
    k.service()
    h = bpf["dp_odh"][ct.c_uint32(1)]
    assert (h.ejected, h.kind, h.clo) == (1, 1, 0)


# ---- the merge rule: the kernel's dp_od_merge against fastpath.outlier.merge ----

MERGE_HOSTS = 12  # one host per step: its DELIVER shows that step's decision


class _MergeModel:
    """dp_odd's merge fields (last_ns, pending, due_ns) as `outlier.merge`
    (Envoy's rule) changes them: a CHANGE decides by it; a DUE delivers a
    pending update once its window ended (the agent's `_service` asks then)."""

    def __init__(self, last_ns: int) -> None:
        self.last, self.pending, self.due = last_ns, 0, 0

    def change(self, now: int, window: int) -> bool:
        what = outlier.merge(now, self.last, bool(self.pending), window)
        if what == "now":
            self.last, self.pending = now, 0
        elif what == "schedule":
            self.pending, self.due = 1, now + window
        return what == "now"

    def due_at(self, now: int) -> bool:
        if not self.pending or now < self.due:
            return False
        self.last, self.pending = now, 0
        return True


def _merge_setup(module: Any, fd: int, window_ns: int) -> int:
    """Every host ejected (delivered at once: no window yet) then unejected
    without a delivery, so each still has lb_out; then the window. Returns
    the detector's last delivery (the kernel's clock at the last ejection)."""
    module["dp_odd"][ct.c_uint32(0)] = agent_outlier.OdDet()
    for s in range(MERGE_HOSTS):
        module["dp_odh"][ct.c_uint32(s)] = agent_outlier.OdHost()
    n, Op = MERGE_HOSTS, agent_outlier.OdOp
    ops = [Op(agent_outlier.OP_CFG, s, 0, 0, 1, 0) for s in range(n)]  # consecutive_5xx 1
    ops += [Op(agent_outlier.OP_DET, 0, 0, 0, n, n, 0)]
    ops += [Op(agent_outlier.OP_STATUS, s, 0, 0, 500) for s in range(n)]
    ops += [Op(agent_outlier.OP_UNEJECT, s) for s in range(n)]
    ops += [Op(agent_outlier.OP_DET, 0, 0, 0, n, n, window_ns)]
    _real_prog_test_run(fd, (Op * len(ops))(*ops))
    det = module["dp_odd"][ct.c_uint32(0)]
    assert (det.ejected, det.lb_out, det.pending) == (0, n, 0)
    return int(det.last_ns)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(window_ms=st.sampled_from([0, 1, 1000]),
       steps=st.lists(st.tuples(st.booleans(), st.integers(-4, 12), st.integers(-1, 1)),
                      min_size=1, max_size=MERGE_HOSTS))
def test_kernel_merge_rule_is_outlier_merge(module: Any, window_ms: int,
                                            steps: list[tuple[bool, int, int]]) -> None:
    """dp_od_ops's CHANGE (dp_od_merge) and DUE, run by the real program over
    generated times around the window's edges (quarters of it, +-1 ns; some
    before the kernel's last delivery, as an agent's clock read before a
    kernel ejection is), decide and leave dp_odd's merge fields as
    `outlier.merge` says: each step's DELIVER moves its host into the LB's
    view exactly when the model delivers."""
    fd = module.load_func("dp_od_ops", type(module).XDP).fd
    window = window_ms * MS
    last0 = _merge_setup(module, fd, window)
    model = _MergeModel(last0)
    quarter = window // 4 or 250 * MS
    for i, (is_change, q, ns_off) in enumerate(steps):
        now = last0 + q * quarter + ns_off
        op = agent_outlier.OP_CHANGE if is_change else agent_outlier.OP_DUE
        ops = (agent_outlier.OdOp * 2)(agent_outlier.OdOp(op, 0, 0, 0, 0, 0, now),
                                       agent_outlier.OdOp(agent_outlier.OP_DELIVER, i))
        _real_prog_test_run(fd, ops)
        want = model.change(now, window) if is_change else model.due_at(now)
        det = module["dp_odd"][ct.c_uint32(0)]
        got = (int(det.last_ns), int(det.pending), int(det.due_ns))
        step = (i, "CHANGE" if is_change else "DUE", now - last0)
        assert got == (model.last, model.pending, model.due), step
        assert module["dp_odh"][ct.c_uint32(i)].lb_out == (0 if want else 1), step
