"""Delta stream rules with fake requests; every response is decoded and checked."""

from __future__ import annotations

from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
)
from envoy_data_plane.google.rpc import Status

from xds_server import resources as res
from xds_server.protocol.common import Ack, Ignored, Nack
from xds_server.protocol.delta import DeltaStream
from xds_server.snapshot import Snapshot

from .helpers import cluster, listener, messages, route, route_config


def snap(clusters=("a",), rc_clusters=("a",), port=1) -> Snapshot:
    return Snapshot.from_messages(messages(
        *[cluster(c, port) for c in clusters],
        listener("l", 10000, "r"),
        route_config("r", [route(f"/{c}", c) for c in rc_clusters]),
    ))


class Checker:
    def __init__(self) -> None:
        self.s = DeltaStream()
        self.nonces: set[str] = set()
        self.last: dict[str, DeltaDiscoveryResponse] = {}

    def send(self, type_url, sub=(), unsub=(), nonce="", error=None, initial=None):
        return self.s.receive(DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(sub), resource_names_unsubscribe=list(unsub),
            response_nonce=nonce, error_detail=error, initial_resource_versions=initial or {}))

    def flush(self) -> list[DeltaDiscoveryResponse]:
        out = []
        for o in self.s.responses():
            d = DeltaDiscoveryResponse.FromString(o.message.data)
            assert d.nonce == o.nonce and d.nonce not in self.nonces
            assert d.type_url == o.type_url and d.system_version_info == o.version
            for r in d.resources:
                assert r.resource.type_url == d.type_url and r.version and r.name
            self.nonces.add(d.nonce)
            self.last[d.type_url] = d
            out.append(d)
        return out

    def ack(self, type_url):
        return self.send(type_url, nonce=self.last[type_url].nonce)


def names(d: DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in d.resources)


def test_wildcard_initial_then_only_changes():
    c = Checker()
    c.s.set_snapshot(snap(clusters=("a", "b")))
    c.send(res.CLUSTER)
    (d,) = c.flush()
    assert names(d) == ["a", "b"] and d.removed_resources == []
    assert isinstance(c.ack(res.CLUSTER)[0], Ack)
    c.s.set_snapshot(snap(clusters=("a", "b", "c")))
    (d2,) = c.flush()
    assert names(d2) == ["c"]  # only what changed


def test_reconnect_with_initial_versions_sends_only_differences_no_spurious_removals():
    first = Checker()
    s = snap(clusters=("a", "b"))
    first.s.set_snapshot(s)
    first.send(res.CLUSTER)
    (d,) = first.flush()
    have = {r.name: r.version for r in d.resources}
    again = Checker()  # a new stream, as after a server restart
    again.s.set_snapshot(snap(clusters=("a", "b")))
    again.send(res.CLUSTER, initial=have)
    (d2,) = again.flush()  # first response always comes, but carries nothing
    assert d2.resources == [] and d2.removed_resources == []
    third = Checker()
    third.s.set_snapshot(snap(clusters=("a",)))
    third.send(res.CLUSTER, initial=have)
    (d3,) = third.flush()
    assert d3.resources == [] and d3.removed_resources == ["b"]


def test_named_subscribe_unsubscribe():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(res.ROUTE, sub=["r"])
    (d,) = c.flush()
    assert names(d) == ["r"]
    c.send(res.ROUTE, unsub=["r"], nonce=d.nonce)
    assert c.flush() == []
    c.send(res.ROUTE, sub=["r"])
    (again,) = c.flush()  # re-subscribing re-sends it: the proxy dropped it
    assert names(again) == ["r"]


def test_nack_not_resent_until_changed():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(res.CLUSTER)
    (d,) = c.flush()
    ev = c.send(res.CLUSTER, nonce=d.nonce, error=Status(code=13, message="rejected by envoy"))
    assert isinstance(ev[0], Nack) and "rejected" in c.s.types[res.CLUSTER].last_error
    assert c.flush() == []
    c.s.set_snapshot(snap(port=2))
    (d2,) = c.flush()
    assert names(d2) == ["a"]


def test_stale_nonce_does_not_ack_but_subscription_applies():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(res.ROUTE, sub=["r"])
    (d,) = c.flush()
    ev = c.send(res.ROUTE, sub=["x"], nonce="999")
    assert isinstance(ev[0], Ignored) and c.s.types[res.ROUTE].pending
    assert "x" in c.s.types[res.ROUTE].names


def test_removal_after_routes_moved():
    c = Checker()
    c.s.set_snapshot(snap(clusters=("a", "old"), rc_clusters=("a", "old")))
    c.send(res.CLUSTER)
    c.send(res.ROUTE, sub=["r"])
    c.flush()
    c.ack(res.CLUSTER)
    c.flush()
    c.ack(res.ROUTE)
    assert c.flush() == []
    c.s.set_snapshot(snap(clusters=("a", "new"), rc_clusters=("a", "new")))
    (cds,) = c.flush()
    assert names(cds) == ["new"] and cds.removed_resources == []
    c.ack(res.CLUSTER)
    (rds,) = c.flush()  # routes only once the proxy has the new cluster
    assert rds.type_url == res.ROUTE
    c.ack(res.ROUTE)
    (step2,) = c.flush()
    assert step2.type_url == res.CLUSTER and step2.removed_resources == ["old"] and step2.resources == []
