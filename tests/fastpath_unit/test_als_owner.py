"""Who owns a node's outlier detectors as its access-log streams come and go
(fastpath/als_owner.py, Agent.als_stream / _als_due), with the fake server of
test_limit_owner_agent: a stream that drops and reconnects within the grace
republishes nothing (no CDS rebuild of the owned clusters); one that stays
closed gives Envoy its detector back once, after the grace. The real Envoy's
streams are in tests/xds/test_als.py."""

from __future__ import annotations

import time

from fastpath.agent import Agent
from fastpath.als_owner import GIVE_UP_S, GRACE_S, AlsOwner

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
    assert own.due(5.0) == ([], []) and not own.live("n9")


def test_a_logger_without_a_stream_is_given_up_once() -> None:
    """The kernel owns a node whose residual has the logger; no stream comes
    within GIVE_UP_S: the node is given up (republished once: the server
    drops the logger), for good; a node with a stream is never given up."""
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
    assert own.due(4.0) == (["n1"], [])
    own.served("n1", 5.0)  # a new plan claimed while the stream is away
    assert own.due(100.0) == ([], []) and not own.given_up("n1")
