"""xds_server.ports picks in L7FP_PORT_RANGE, and each pytest-xdist worker has a
slice of its own (tests/support/workers.py), so two test files running at once
never pick the same port."""

from __future__ import annotations

import os

import pytest

from tests.support.workers import port_slice, worker_port_range
from xds_server import ports


def test_picks_stay_in_the_range_set(monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = ports.port_range()
    monkeypatch.setenv(ports.RANGE_ENV, f"{low}-{low + 9}")
    assert ports.port_range() == (low, low + 9)
    picked = ports.free_ports(4)
    assert len(set(picked)) == 4 and all(low <= p <= low + 9 for p in picked), picked
    with pytest.raises(ValueError, match="11 ports asked"):
        ports.free_ports(11)


def test_a_port_is_not_handed_out_twice_before_it_is_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Picks before any of them is bound (an Envoy's admin and listener ports, the 12
    of test_tracing_inbound_envoy) could draw one port twice: without the memory of
    recent picks, 128 draws from 1000 ports repeat one with probability ~1 - e^-8."""
    low, _ = ports.port_range()
    monkeypatch.setenv(ports.RANGE_ENV, f"{low}-{low + 999}")
    picked = [ports.pick_free_port() for _ in range(ports.RECENT)]
    assert len(set(picked)) == ports.RECENT, sorted(picked)


@pytest.mark.parametrize("spec", ["20000", "2-1", "0-10", "a-b", "1-65536"])
def test_a_bad_range_names_the_variable(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ports.RANGE_ENV, spec)
    with pytest.raises(ValueError, match=f"L7FP_PORT_RANGE='{spec}': expected LO-HI"):
        ports.port_range()


def test_without_the_variable_the_picks_avoid_the_ephemeral_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ports.RANGE_ENV, raising=False)
    lo, hi = ports._ephemeral()
    assert all(not lo <= p <= hi for p in ports.free_ports(20))


def test_worker_slices_are_disjoint_and_cover_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ports.RANGE_ENV, raising=False)
    low, high = ports.port_range()
    for count in (2, 3):
        slices = [worker_port_range({"PYTEST_XDIST_WORKER": f"gw{i}",
                                     "PYTEST_XDIST_WORKER_COUNT": str(count)}) for i in range(count)]
        bounds = [tuple(map(int, s.split("-"))) for s in slices if s]
        assert len(bounds) == count and bounds[0][0] == low and bounds[-1][1] == high, bounds
        assert all(a[1] + 1 == b[0] for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert port_slice(1, 10, 1, 3) == (4, 6) and port_slice(1, 10, 2, 3) == (7, 10)
    assert worker_port_range({}) is None  # not under xdist: the whole range
    assert worker_port_range({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "1"}) is None


def test_this_worker_picks_from_its_own_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """What tests/conftest.py set up for this process under xdist (make test): the
    worker's own slice, which every pick (and every process the tests start) keeps to."""
    if worker_port_range() is None:
        pytest.skip("not in a pytest-xdist worker (make test runs 2)")
    own = os.environ.get(ports.RANGE_ENV)
    assert own is not None, "tests/conftest.py gave this worker no port range"
    low, high = map(int, own.split("-"))
    assert all(low <= p <= high for p in ports.free_ports(20))
    monkeypatch.delenv(ports.RANGE_ENV)
    assert own == worker_port_range()  # this worker's slice of the whole range
