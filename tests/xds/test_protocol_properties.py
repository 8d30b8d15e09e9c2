"""Property tests: random snapshot sequences, ACKs and NACKs against the stream state machines.

A model client applies every response; once it has answered everything, its
view must equal the latest snapshot, whatever happened before. Along the way:
unique nonces, at most one response in flight per type, no NACKed
(version, subscription) re-sent.
"""

from __future__ import annotations

from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.rpc import Status
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server import resources as res
from xds_server.protocol.delta import DeltaStream
from xds_server.protocol.sotw import SotwStream
from xds_server.snapshot import Snapshot

from .helpers import cluster, listener, messages, route, route_config

POOL = ["a", "b", "c", "d"]


def make_snapshot(clusters: frozenset[str], port: int) -> Snapshot:
    cl = sorted(clusters) or ["a"]
    return Snapshot.from_messages(messages(
        *[cluster(c, port) for c in cl], listener("l", 10000, "r"),
        route_config("r", [route(f"/{c}", c) for c in cl])))


snapshots = st.builds(make_snapshot, st.frozensets(st.sampled_from(POOL)), st.integers(1, 3))
# each step: a new snapshot, or answer (ACK/NACK) the oldest unanswered response
steps = st.lists(st.one_of(snapshots, st.sampled_from(["ack", "nack"])), min_size=1, max_size=12)


def expected(snap: Snapshot) -> dict[str, dict[str, str]]:
    return {t: {n: e.version for n, e in snap.of_type(t).items()} for t in (res.CLUSTER, res.ROUTE)}


@settings(max_examples=60, deadline=None)
@given(first=snapshots, steps=steps)
def test_delta_invariants_with_nacks(first, steps):
    s = DeltaStream()
    s.set_snapshot(first)
    s.receive(DeltaDiscoveryRequest(type_url=res.CLUSTER))
    s.receive(DeltaDiscoveryRequest(type_url=res.ROUTE, resource_names_subscribe=["r"]))
    have: dict[str, dict[str, str]] = {res.CLUSTER: {}, res.ROUTE: {}}
    inflight: list[DeltaDiscoveryResponse] = []
    nonces: set[str] = set()

    def pump():
        for o in s.responses():
            d = DeltaDiscoveryResponse.FromString(o.message.data)
            assert d.nonce not in nonces
            assert all(x.type_url != d.type_url for x in inflight), "one in flight per type"
            nonces.add(d.nonce)
            inflight.append(d)

    def answer(nack: bool):
        d = inflight.pop(0)
        if not nack:
            for r in d.resources:
                have[d.type_url][r.name] = r.version
            for n in d.removed_resources:
                have[d.type_url].pop(n, None)
        s.receive(DeltaDiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce,
                                        error_detail=Status(message="no") if nack else None))

    pump()
    for step in steps:
        if isinstance(step, Snapshot):
            s.set_snapshot(step)
        elif inflight:
            answer(step == "nack")
        pump()
    for _ in range(20):  # answer everything (ACK) until quiet: the stream must go quiet
        if not inflight:
            break
        answer(False)
        pump()
    assert not inflight


@settings(max_examples=60, deadline=None)
@given(first=snapshots, steps=st.lists(st.one_of(snapshots, st.just("ack")), min_size=1, max_size=12))
def test_delta_converges_exactly_without_nacks(first, steps):
    s = DeltaStream()
    s.set_snapshot(first)
    s.receive(DeltaDiscoveryRequest(type_url=res.CLUSTER))
    s.receive(DeltaDiscoveryRequest(type_url=res.ROUTE, resource_names_subscribe=["r"]))
    have: dict[str, dict[str, str]] = {res.CLUSTER: {}, res.ROUTE: {}}
    latest = first
    queue: list[DeltaDiscoveryResponse] = []

    def pump():
        queue.extend(DeltaDiscoveryResponse.FromString(o.message.data) for o in s.responses())

    def ack():
        d = queue.pop(0)
        for r in d.resources:
            have[d.type_url][r.name] = r.version
        for n in d.removed_resources:
            have[d.type_url].pop(n, None)
        s.receive(DeltaDiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce))

    pump()
    for step in steps:
        if isinstance(step, Snapshot):
            s.set_snapshot(step)
            latest = step
        elif queue:
            ack()
        pump()
    while queue:
        ack()
        pump()
    assert have == expected(latest)


@settings(max_examples=60, deadline=None)
@given(first=snapshots, steps=steps)
def test_sotw_converges_and_never_resends_a_nacked_version(first, steps):
    s = SotwStream()
    s.set_snapshot(first)
    s.receive(DiscoveryRequest(type_url=res.CLUSTER))
    s.receive(DiscoveryRequest(type_url=res.ROUTE, resource_names=["r"]))
    have: dict[str, dict[str, str]] = {res.CLUSTER: {}, res.ROUTE: {}}
    inflight: list[DiscoveryResponse] = []
    nacked: set[tuple[str, str]] = set()
    last_nacked: dict[str, str] = {}
    latest = first

    def pump():
        for o in s.responses():
            d = DiscoveryResponse.FromString(o.message.data)
            # the response right after a NACK never repeats the NACKed version (names are fixed
            # here); going back to that content after another version is a new config, not a loop
            assert (d.type_url, d.version_info) not in nacked, "NACKed version re-sent"
            nacked.discard(next((x for x in nacked if x[0] == d.type_url), None))
            assert all(x.type_url != d.type_url for x in inflight), "one in flight per type"
            inflight.append(d)

    def answer(nack: bool):
        d = inflight.pop(0)
        names = [] if d.type_url == res.CLUSTER else ["r"]
        if nack:
            last_nacked[d.type_url] = d.version_info
            nacked.add((d.type_url, d.version_info))
            s.receive(DiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce, resource_names=names,
                                       error_detail=Status(message="no")))
            return
        have[d.type_url] = {res.resource_name(a.unpack()): "" for a in d.resources}
        s.receive(DiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce, resource_names=names,
                                   version_info=d.version_info))

    pump()
    for step in steps:
        if isinstance(step, Snapshot):
            s.set_snapshot(step)
            latest = step
        elif inflight:
            answer(step == "nack")
        pump()
    while inflight:
        answer(False)
        pump()
    for t in (res.CLUSTER, res.ROUTE):
        if t not in last_nacked:  # once NACKed, a type may rightly stay on an older version
            assert set(have[t]) == set(latest.of_type(t)), (t, have[t])


@settings(max_examples=80, deadline=None)
@given(first=snapshots, steps=st.lists(st.one_of(snapshots, st.just("ack")), min_size=1, max_size=14))
def test_sotw_make_before_break_never_leaves_a_route_dangling(first, steps):
    """Applying responses in the order sent, no route ever points at a cluster the proxy lacks."""
    s = SotwStream()
    s.set_snapshot(first)
    s.receive(DiscoveryRequest(type_url=res.CLUSTER))
    s.receive(DiscoveryRequest(type_url=res.ROUTE, resource_names=["r"]))
    clusters: set[str] = set()
    referenced: set[str] = set()
    inflight: list[DiscoveryResponse] = []

    def pump():
        inflight.extend(DiscoveryResponse.FromString(o.message.data) for o in s.responses())

    def apply_and_ack():
        nonlocal clusters, referenced
        d = inflight.pop(0)
        msgs = [a.unpack() for a in d.resources]
        if d.type_url == res.CLUSTER:
            clusters = {m.name for m in msgs}
        else:
            referenced = {r.route.cluster for m in msgs for vh in m.virtual_hosts for r in vh.routes}
        assert referenced <= clusters, (referenced, clusters)
        names = [] if d.type_url == res.CLUSTER else ["r"]
        s.receive(DiscoveryRequest(type_url=d.type_url, response_nonce=d.nonce, resource_names=names,
                                   version_info=d.version_info))

    pump()
    for step in steps:
        if isinstance(step, Snapshot):
            s.set_snapshot(step)
        elif inflight:
            apply_and_ack()
        pump()
    while inflight:
        apply_and_ack()
        pump()
