"""Who owns a node's outlier detectors as its access-log streams come and go
(fastpath/als_owner.py, Agent.als_stream / _als_due), with the fake server of
test_limit_owner_agent: a stream that drops and reconnects within the grace
republishes nothing (no CDS rebuild of the owned clusters); one that stays
closed gives Envoy its detector back once, after the grace. The real Envoy's
streams are in tests/xds/test_als.py."""

from __future__ import annotations

import time

from fastpath.agent import Agent
from fastpath.als_owner import GIVE_UP_S, GRACE_S, RETRY_FIRST_S, RETRY_MAX_S, AlsOwner

from .test_limit_owner_agent import FakeServer


def test_a_reconnect_within_the_grace_changes_nothing() -> None:
    a, srv = Agent(None), FakeServer()
    a.server = srv
    a.als_stream("n1", True)
    assert srv.calls == [("resplit", ["n1"])] and a.als.live("n1")
    a.als_stream("n1", False)  # the stream drops...
    a._als_due(time.monotonic() + GRACE_S / 2)
    assert a.als.live("n1") and a.hosts_out("n1") == {}  # still the kernel's (not owned: {})
    a.als_stream("n1", True)  # ...and Envoy reconnects within the grace
    a._als_due(time.monotonic() + GRACE_S * 2)
    assert srv.calls == [("resplit", ["n1"])] and a.als.live("n1")


def test_a_closed_stream_gives_ownership_back_after_the_grace_once() -> None:
    a, srv = Agent(None), FakeServer()
    a.server = srv
    a.als_stream("n1", True)
    a.als_stream("n2", True)
    srv.calls.clear()
    a.als_stream("n1", False)
    now = time.monotonic()
    a._als_due(now + GRACE_S - 0.5)
    assert srv.calls == [] and a.debug()["outlier_access_log"]["grace_left_s"]["n1"] > 0
    a._als_due(now + GRACE_S + 0.1)
    a._als_due(now + GRACE_S + 0.2)
    assert srv.calls == [("resplit", ["n1"])]
    assert not a.als.live("n1") and a.hosts_out("n1") is None  # Envoy's detector again
    assert a.als.live("n2")


def test_a_close_of_a_node_never_live_is_nothing() -> None:
    own = AlsOwner(grace_s=1.0)
    own.closed("n9", 0.0)
    assert own.due(5.0) == ([], [], []) and not own.live("n9")


def test_a_logger_without_a_stream_is_given_up_once() -> None:
    """The kernel owns a node whose residual has the logger; no stream comes
    within GIVE_UP_S: the node is given up (republished once: the server
    drops the logger) until its backoff ends; a node with a stream is never
    given up."""
    from fastpath.split import split_snapshot

    from .test_residual_outlier import resources

    a, srv = Agent(None), FakeServer()
    a.server = srv
    node, other = "sidecar~198.18.0.9~c-0.t~t.svc.cluster.local", "sidecar~198.18.0.8~c-1.t~t.svc.cluster.local"
    for n in (node, other):
        a._claim(n, split_snapshot(n, resources()).plan)
    a.als_stream(other, True)
    srv.calls.clear()
    now = time.monotonic()
    a._als_due(now + GIVE_UP_S - 1)
    assert srv.calls == [] and not a.als.given_up(node)
    a._als_due(now + GIVE_UP_S + 1)
    a._als_due(now + GIVE_UP_S + 2)
    assert srv.calls == [("resplit", [node])]
    assert a.als.given_up(node) and not a.als.given_up(other)
    assert a.debug()["outlier_access_log"]["given_up"] == [node]
    srv.calls.clear()
    a._als_due(now + GIVE_UP_S + RETRY_FIRST_S + 1)  # the backoff ended: the logger again
    a._als_due(now + GIVE_UP_S + RETRY_FIRST_S + 2)
    assert srv.calls == [("resplit", [node])] and not a.als.given_up(node)


def test_a_node_without_logger_is_never_waited_for() -> None:
    from fastpath.split import split_snapshot

    from .test_residual_outlier import resources

    a, srv = Agent(None), FakeServer()
    a.server = srv
    a._claim("demo", split_snapshot("demo", resources()).plan)  # no IP: no logger
    a._als_due(time.monotonic() + GIVE_UP_S * 2)
    assert not a.als.given_up("demo") and srv.calls == [("resplit", ["demo"])]


def test_a_node_that_had_a_stream_is_never_given_up() -> None:
    own = AlsOwner(grace_s=1.0, give_up_s=10.0)
    own.served("n1", 0.0)
    own.opened("n1", 1.0)
    own.closed("n1", 2.0)
    assert own.due(4.0) == (["n1"], [], [])
    own.served("n1", 5.0)  # a new plan claimed while the stream is away
    assert own.due(100.0) == ([], [], []) and not own.given_up("n1")


def test_a_given_up_node_is_offered_the_logger_again_with_a_doubling_backoff() -> None:
    """Fake clock, a look every 0.5 s for 3,000 s: a node that never logs is
    given up after GIVE_UP_S, offered the logger again RETRY_FIRST_S later,
    given up again GIVE_UP_S after that with twice the backoff, ... up to
    RETRY_MAX_S: one change of its residual (logger off, logger on) per
    event, never one per look."""
    own = AlsOwner()
    own.served("n1", 0.0)
    events: list[tuple[float, str]] = []
    t = 0.0
    while t < 3000.0:
        t += 0.5
        _gone, quiet, again = own.due(t)
        events += [(t, "off") for _ in quiet] + [(t, "on") for _ in again]
    waits, on_at = [], 0.0
    for (t_off, off), (t_on, on) in zip(events[::2], events[1::2], strict=False):
        assert (off, on) == ("off", "on")
        assert t_off - on_at == GIVE_UP_S  # each offer waits GIVE_UP_S for a stream
        waits.append(t_on - t_off)
        on_at = t_on
    assert waits[:6] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S, 8 * RETRY_FIRST_S,
                         RETRY_MAX_S, RETRY_MAX_S]
    assert len(events) <= 2 * (3000 // (RETRY_FIRST_S + GIVE_UP_S))  # bounded: not per look


def test_a_stream_after_the_retry_makes_the_node_proven() -> None:
    """A sidecar that starts late: given up, offered again after the backoff,
    its stream then comes: live (Envoy's detector goes to the kernel) and
    never given up again; a stream that comes while given up (a logger Envoy
    still had) counts as well."""
    own = AlsOwner(grace_s=1.0, give_up_s=30.0, retry_s=(60.0, 600.0))
    own.served("late", 0.0)
    own.served("hiccup", 0.0)
    assert own.due(30.0) == ([], ["late", "hiccup"], [])
    assert own.given_up("late") and own.debug(40.0)["retry_in_s"] == {"hiccup": 50.0, "late": 50.0}
    assert own.opened("hiccup", 45.0) and not own.given_up("hiccup")  # still had the logger
    assert own.due(90.0) == ([], [], ["late"]) and not own.given_up("late")
    assert own.debug(91.0)["waiting_s"] == {"late": 1.0}
    assert own.opened("late", 100.0) and own.live("late")
    own.closed("late", 110.0)
    assert own.due(1000.0) == (["late"], [], []) and not own.given_up("late")


def test_a_retry_of_a_node_the_kernel_released_waits_for_its_next_claim() -> None:
    own = AlsOwner(give_up_s=30.0, retry_s=(60.0, 600.0))
    own.served("n1", 0.0)
    assert own.due(30.0) == ([], ["n1"], [])
    own.unserved("n1")  # the kernel released the node meanwhile: no logger to offer
    assert own.due(90.0) == ([], [], ["n1"]) and own.debug(90.0)["waiting_s"] == {}
    own.served("n1", 200.0)  # claimed again: the logger's wait starts now
    assert own.due(229.0) == ([], [], []) and own.due(230.0) == ([], ["n1"], [])
    assert own.retry_in("n1", 230.0) == 120.0  # the backoff doubled
