"""One deadline over all attempts (fastpath.deadline) and the timer thread's
claim rules with retries (fastpath.timeouts.TimeoutKeeper._expire), over fake
maps: who answers the client when a retry and the timer race."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fastpath import deadline, timeouts
from fastpath.deadline import expected_timeout_ms, next_deadline, with_expected_timeout

MS = 1_000_000


def test_next_deadline_is_the_earlier_timer() -> None:
    assert next_deadline(0, 600, 10 * MS) == 610 * MS  # per-try only
    assert next_deadline(1000 * MS, 0, 10 * MS) == 1000 * MS  # route only: unchanged
    assert next_deadline(1000 * MS, 600, 300 * MS) == 900 * MS
    assert next_deadline(1000 * MS, 600, 600 * MS) == 1000 * MS  # route deadline first


def test_expected_timeout_as_envoy_sets_it() -> None:
    start = 5_000 * MS  # the request completed here: route deadline start + 1000 ms
    g = start + 1000 * MS
    assert expected_timeout_ms(1000, 0, g, start) == 1000
    assert expected_timeout_ms(1000, 0, g, start + 380 * MS + 999_999) == 620  # whole ms gone
    assert expected_timeout_ms(1000, 300, g, start + 100 * MS) == 300  # per-try first
    assert expected_timeout_ms(1000, 300, g, start + 800 * MS) == 200  # at most the time left
    assert expected_timeout_ms(1000, 0, g, start + 1200 * MS) == 1  # out of time: 1
    assert expected_timeout_ms(0, 600, 0, start) == 600
    assert expected_timeout_ms(0, 0, 0, start) is None


def test_expected_header_rewritten_only_where_inserted() -> None:
    req = (b"GET / HTTP/1.1\r\nhost: a\r\nx-envoy-expected-rq-timeout-ms: 1000\r\n\r\n"
           b"x-envoy-expected-rq-timeout-ms: 1000\r\n")  # a body that looks like a header
    out = with_expected_timeout(req, 620)
    assert out == req.replace(b"1000\r\n\r\n", b"620\r\n\r\n", 1)
    assert with_expected_timeout(b"GET / HTTP/1.1\r\n\r\n", 5) == b"GET / HTTP/1.1\r\n\r\n"
    assert with_expected_timeout(req, None) == req


class FakeTable(dict):  # type: ignore[type-arg]
    """A BCC table: Key(int) -> item; missing keys raise KeyError."""

    class Key(int):
        @property
        def value(self) -> int:
            return int(self)

    def __getitem__(self, k: Any) -> Any:
        return dict.__getitem__(self, int(k))

    def __setitem__(self, k: Any, v: Any) -> None:
        dict.__setitem__(self, int(k), v)

    def items(self) -> Any:
        return [(self.Key(k), v) for k, v in dict.items(self)]


class FakeDp:
    """dp_tmo as a table, dp_tmo_armed as the set of armed upstream cookies."""

    def __init__(self) -> None:
        self.bpf = {"dp_tmo": FakeTable()}
        self.armed: set[int] = set()
        self.fds = {"dp_tmo_armed": "armed", "dp_tmo": "tmo"}
        self.taken: list[int] = []

    def take_upstream(self, up: int) -> None:
        self.taken.append(up)


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> FakeDp:
    d = FakeDp()

    def delete(fd: str, key: Any) -> bool:
        k = int(key.value)
        if fd == "armed":
            ok = k in d.armed
            d.armed.discard(k)
            return ok
        return d.bpf["dp_tmo"].pop(k, None) is not None

    def update(fd: str, key: Any, value: Any) -> None:
        assert fd == "armed"
        d.armed.add(int(key.value))

    for mod in (deadline.bpfsys, timeouts.bpfsys):
        monkeypatch.setattr(mod, "map_delete", delete)
        monkeypatch.setattr(mod, "map_update", update)
    return d


def record(deadline_ns: int, state: int = 2, global_ns: int = 0, try_ms: int = 0) -> Any:
    return SimpleNamespace(deadline_ns=deadline_ns, state=state, global_ns=global_ns,
                           try_ms=try_ms, timeout_ms=1000 if global_ns else 0, left=0,
                           client=7, route=1, cli_ip=1, cli_port=2, dst_ip=3, dst_port=4)


def test_retry_moves_the_record_and_keeps_the_route_deadline(dp: FakeDp) -> None:
    dp.bpf["dp_tmo"][10] = record(2000 * MS, global_ns=2000 * MS, try_ms=300)
    dp.armed.add(10)
    had, rec = deadline.claim(dp, 10)
    assert had and rec is not None and 10 not in dp.armed
    deadline.rearm(dp, 10, 11, rec, 1000 * MS)
    assert set(dp.bpf["dp_tmo"]) == {11} and dp.armed == {11}
    assert dp.bpf["dp_tmo"][11].deadline_ns == 1300 * MS  # a fresh per-try timer
    assert deadline.claim(dp, 11)[1] is not None  # claim + rearm on the same upstream
    deadline.rearm(dp, 11, 11, rec, 1900 * MS)
    assert dp.bpf["dp_tmo"][11].deadline_ns == 2000 * MS and dp.armed == {11}


def test_retry_after_the_504_is_dropped(dp: FakeDp) -> None:
    dp.bpf["dp_tmo"][10] = record(1000 * MS, global_ns=1000 * MS)
    assert deadline.claim(dp, 10) == (True, None)  # the timer claimed it (armed gone)
    assert deadline.claim(dp, 12) == (False, None)  # no record: the plan tells


def keeper(dp: FakeDp, monkeypatch: pytest.MonkeyPatch) -> timeouts.TimeoutKeeper:
    k = timeouts.TimeoutKeeper(dp, None)
    monkeypatch.setattr(k, "_inject", lambda client, data: True)
    monkeypatch.setattr(timeouts, "destroy_socket", lambda *a: 0)
    monkeypatch.setattr(timeouts.time, "monotonic_ns", lambda: 5000 * MS)
    return k


def test_keeper_answers_504_when_it_wins(dp: FakeDp, monkeypatch: pytest.MonkeyPatch) -> None:
    k = keeper(dp, monkeypatch)
    dp.bpf["dp_tmo"][10] = record(1000 * MS, global_ns=1000 * MS)
    dp.armed.add(10)
    assert k.check() == 1
    assert k.counts["timeout_504"] == 1 and dp.taken == [10] and not dp.bpf["dp_tmo"]


def test_keeper_leaves_a_record_a_retry_holds(dp: FakeDp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim lost on a WAIT record: a retry is moving it. Neither 504 nor reset,
    the upstream stays; a record lost twice with the same deadline is stale."""
    k = keeper(dp, monkeypatch)
    dp.bpf["dp_tmo"][10] = record(1000 * MS, global_ns=1000 * MS)  # not armed: claimed
    k.check()
    assert dp.taken == [] and sum(k.counts.values()) == 0 and 10 in dp.bpf["dp_tmo"]
    k.check()
    assert not dp.bpf["dp_tmo"] and dp.taken == []


def test_keeper_gives_back_a_claim_on_a_re_armed_record(dp: FakeDp,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Scanned expired, then a retry re-armed it with a later deadline: no 504."""
    k = keeper(dp, monkeypatch)
    dp.bpf["dp_tmo"][10] = record(6000 * MS, try_ms=600)
    dp.armed.add(10)
    k._expire(timeouts.Expired(10, 7, 2, 1, 1, 2, 3, 4, deadline_ns=4000 * MS))
    assert dp.armed == {10} and dp.taken == [] and k.counts["timeout_504"] == 0


def test_keeper_resets_a_started_response(dp: FakeDp, monkeypatch: pytest.MonkeyPatch) -> None:
    k = keeper(dp, monkeypatch)
    dp.bpf["dp_tmo"][10] = record(1000 * MS, state=3, global_ns=1000 * MS)
    k.check()
    assert k.counts["timeout_reset"] == 1 and dp.taken == [10]


def test_kernel_drops_the_header_the_inbound_sidecar_strips() -> None:
    """x-envoy-expected-rq-timeout-ms never reaches an app behind a sidecar
    without use_remote_address (the request is external to it): the kernel,
    which delivers past that sidecar, must not insert it either."""
    import dataclasses

    from fastpath.inbound_merge import merge
    from fastpath.plan import HeaderValue
    from fastpath_unit.test_timeouts_unit import DST, client, dest

    hdr = HeaderValue("x-envoy-expected-rq-timeout-ms", "1000", append=True)
    base = client()
    lp = base.listeners[0]
    routes = tuple(dataclasses.replace(r, request_headers_to_add=(hdr,))
                   for r in lp.virtual_hosts[0].routes)
    vh = dataclasses.replace(lp.virtual_hosts[0], routes=routes)
    plan = dataclasses.replace(base, listeners=(dataclasses.replace(lp, virtual_hosts=(vh,)),))

    def adds(p: Any) -> list[tuple[str, ...]]:
        return [tuple(h.name for h in r.request_headers_to_add)
                for r in p.listeners[0].virtual_hosts[0].routes]

    assert adds(merge(plan, lambda ip: dest(None)).plan) == [(), (), ()]
    remote = dest(None)
    remote = dataclasses.replace(remote, listeners=(dataclasses.replace(
        remote.listeners[0], use_remote_address=True),))
    assert adds(merge(plan, lambda ip: remote).plan) == [(hdr.name,)] * 3
    assert adds(merge(plan, lambda ip: None).plan) == [(hdr.name,)] * 3  # to Envoy anyway
    assert DST == "198.18.0.9"
