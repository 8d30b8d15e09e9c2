"""Who owns a node's outlier detectors as its access-log streams come and go
(fastpath/als_owner.py, Agent.als_stream / _als_due), with the fake server of
test_limit_owner_agent: a stream that drops and reconnects within the grace
republishes nothing (no CDS rebuild of the owned clusters); one that stays
closed gives Envoy its detector back once, after the grace. The real Envoy's
streams are in tests/xds/test_als.py."""

from __future__ import annotations

import time

from fastpath.agent import Agent
from fastpath.als_owner import GRACE_S, AlsOwner

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
    assert own.due(5.0) == [] and not own.live("n9")
