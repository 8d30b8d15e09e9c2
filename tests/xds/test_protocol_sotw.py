"""SotW stream rules, driven with fake requests; every response is decoded and checked."""

from __future__ import annotations

from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.rpc import Status

from xds_server import resources as res
from xds_server.protocol.common import Ack, Ignored, Nack
from xds_server.protocol.sotw import SotwStream
from xds_server.snapshot import Snapshot

from .helpers import cluster, listener, messages, route, route_config

ALL_TYPES = [res.CLUSTER, res.ENDPOINT, res.LISTENER, res.ROUTE]


def snap(clusters=("a",), rc_clusters=("a",)) -> Snapshot:
    return Snapshot.from_messages(messages(
        *[cluster(c) for c in clusters],
        listener("l", 10000, "r"),
        route_config("r", [route(f"/{c}", c) for c in rc_clusters]),
    ))


class Checker:
    """Wraps a SotwStream; decodes every response and checks the nonce/version rules."""

    def __init__(self) -> None:
        self.s = SotwStream()
        self.nonces: set[str] = set()
        self.last: dict[str, DiscoveryResponse] = {}

    def req(self, type_url, names=(), nonce="", version="", error=None):
        return DiscoveryRequest(type_url=type_url, resource_names=list(names), response_nonce=nonce,
                                version_info=version, error_detail=error)

    def send(self, *reqs):
        events = []
        for r in reqs:
            events += self.s.receive(r)
        return events

    def flush(self) -> list[DiscoveryResponse]:
        out = []
        for o in self.s.responses():
            d = DiscoveryResponse.FromString(o.message.data)
            assert d.nonce == o.nonce and d.nonce not in self.nonces, "nonces are unique per stream"
            assert d.type_url == o.type_url and d.version_info == o.version
            assert all(a.type_url == d.type_url for a in d.resources)
            self.nonces.add(d.nonce)
            self.last[d.type_url] = d
            out.append(d)
        return out

    def ack(self, type_url, names=()):
        d = self.last[type_url]
        return self.send(self.req(type_url, names, d.nonce, d.version_info))


def names_of(d: DiscoveryResponse) -> list[str]:
    return sorted(res.resource_name(a.unpack()) for a in d.resources)


def test_initial_wildcard_and_named_subscriptions():
    c = Checker()
    c.s.set_snapshot(snap(clusters=("a", "b")))
    c.send(c.req(res.CLUSTER), c.req(res.LISTENER))
    out = c.flush()
    assert [d.type_url for d in out] == [res.CLUSTER]  # listeners wait for the clusters' answer
    assert names_of(out[0]) == ["a", "b"]
    c.ack(res.CLUSTER)
    assert [d.type_url for d in c.flush()] == [res.LISTENER]
    c.send(c.req(res.ROUTE, ["r"]))
    (rds,) = c.flush()
    assert names_of(rds) == ["r"]
    c.send(c.req(res.ROUTE, ["nope"], rds.nonce, rds.version_info))
    (rds2,) = c.flush()  # new names: answered even with the same version
    assert rds2.resources == [] and rds2.version_info == rds.version_info


def test_ack_then_nothing_resent_and_versions_are_content_hashes():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(c.req(res.CLUSTER))
    (cds,) = c.flush()
    assert isinstance(c.ack(res.CLUSTER)[0], Ack)
    assert c.flush() == []
    c.s.set_snapshot(snap())  # same content, new object: same version, nothing sent
    assert c.flush() == []
    c.s.set_snapshot(snap(clusters=("a", "z")))
    (cds2,) = c.flush()
    assert cds2.version_info != cds.version_info and names_of(cds2) == ["a", "z"]


def test_one_response_in_flight_per_type():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(c.req(res.CLUSTER))
    (first,) = c.flush()
    c.s.set_snapshot(snap(clusters=("a", "b")))
    assert c.flush() == []  # waits for the ACK of `first`
    evs = c.ack(res.CLUSTER)
    assert isinstance(evs[0], Ack) and evs[0].version == first.version_info
    (second,) = c.flush()
    assert names_of(second) == ["a", "b"]


def test_nack_keeps_error_and_is_not_resent():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(c.req(res.CLUSTER))
    (cds,) = c.flush()
    evs = c.send(c.req(res.CLUSTER, nonce=cds.nonce, version="", error=Status(code=3, message="bad\x00cluster")))
    assert isinstance(evs[0], Nack) and "bad" in evs[0].error and evs[0].version == cds.version_info
    assert c.flush() == []  # the NACKed version is not sent again
    st = c.s.types[res.CLUSTER]
    assert st.nacked_version == cds.version_info and "bad" in st.last_error and st.acked_version == ""
    c.s.set_snapshot(snap(clusters=("a", "c")))
    (fixed,) = c.flush()  # a new version goes out
    assert fixed.version_info != cds.version_info


def test_stale_nonce_ignored():
    c = Checker()
    c.s.set_snapshot(snap())
    c.send(c.req(res.CLUSTER))
    (one,) = c.flush()
    c.ack(res.CLUSTER)
    c.s.set_snapshot(snap(clusters=("a", "b")))
    (two,) = c.flush()
    evs = c.send(c.req(res.CLUSTER, nonce=one.nonce, version=one.version_info))
    assert isinstance(evs[0], Ignored) and "stale" in evs[0].reason
    assert c.s.types[res.CLUSTER].pending  # still waiting for `two`'s answer
    assert c.flush() == []


def test_make_before_break_removal_after_routes_moved():
    c = Checker()
    c.s.set_snapshot(snap(clusters=("a", "old"), rc_clusters=("a", "old")))
    c.send(c.req(res.CLUSTER), c.req(res.LISTENER))
    c.flush()
    c.ack(res.CLUSTER)
    c.flush()
    c.ack(res.LISTENER)
    c.send(c.req(res.ROUTE, ["r"]))
    c.flush()
    c.ack(res.ROUTE, ["r"])
    assert c.flush() == []
    # new config: route moves off "old", cluster "old" removed, cluster "new" added
    c.s.set_snapshot(snap(clusters=("a", "new"), rc_clusters=("a", "new")))
    (cds,) = c.flush()
    assert names_of(cds) == ["a", "new", "old"]  # adds first, "old" kept until routes moved
    c.ack(res.CLUSTER)
    (rds,) = c.flush()  # routes only once the proxy has the new cluster
    assert rds.type_url == res.ROUTE
    assert c.flush() == []  # routes still unanswered
    c.ack(res.ROUTE, ["r"])
    (step2,) = c.flush()
    assert step2.type_url == res.CLUSTER and names_of(step2) == ["a", "new"]


def test_legacy_wildcard_and_explicit_star():
    c = Checker()
    c.s.set_snapshot(snap(clusters=("a", "b")))
    c.send(c.req(res.CLUSTER, ["*", "a"]))
    (d,) = c.flush()
    assert names_of(d) == ["a", "b"]
    c.send(c.req(res.CLUSTER, ["a"], d.nonce, d.version_info))
    (only_a,) = c.flush()
    assert names_of(only_a) == ["a"]


def test_unknown_type_is_ignored_not_answered():
    c = Checker()
    c.s.set_snapshot(snap())
    evs = c.send(c.req("type.googleapis.com/no.such.Type"))
    assert any(isinstance(e, Ignored) for e in evs)
    assert c.flush() == []
    assert c.send(DiscoveryRequest()) and c.flush() == []


def test_opaque_type_served_when_in_snapshot():
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig

    url = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    s = Snapshot.from_messages({url: [TypedExtensionConfig(name="x")]})
    c = Checker()
    c.s.set_snapshot(s)
    c.send(c.req(url))
    (d,) = c.flush()
    assert d.resources[0].type_url == url


def test_unwatched_type_does_not_block_removals():
    """Envoy does not ACK a response for a type it stopped watching (its request with the
    empty name list may even be stale): that must not hold back later removals."""
    from .helpers import eds_cluster, endpoints

    def snap_of(clusters, eds: bool) -> Snapshot:
        extra = [eds_cluster("three"), endpoints("three", 9)] if eds else []
        return Snapshot.from_messages(messages(
            *[cluster(x) for x in clusters], *extra, listener("l", 10000, "r"),
            route_config("r", [route("/", clusters[0])])))

    c = Checker()
    c.s.set_snapshot(snap_of(["a"], True))
    c.send(c.req(res.CLUSTER))
    c.flush()
    c.ack(res.CLUSTER)
    c.send(c.req(res.ROUTE, ["r"]), c.req(res.ENDPOINT, ["three"]))
    c.flush()
    c.ack(res.ROUTE, ["r"])
    eds = c.last[res.ENDPOINT]
    c.ack(res.ENDPOINT, ["three"])
    assert c.flush() == []
    c.s.set_snapshot(snap_of(["a"], False))  # cluster "three" goes: a pure removal
    out = c.flush()
    assert [d.type_url for d in out] == [res.CLUSTER, res.ENDPOINT]
    c.ack(res.CLUSTER)
    # Envoy dropped its EDS watch: it never ACKs `out[1]`; its last EDS request is stale
    c.send(c.req(res.ENDPOINT, [], eds.nonce, eds.version_info))
    assert not c.s.types[res.ENDPOINT].pending
    c.s.set_snapshot(snap_of(["z"], False))  # the route moves from "a" to new "z"
    (cds,) = c.flush()
    assert names_of(cds) == ["a", "z"]
    c.ack(res.CLUSTER)
    (rds,) = c.flush()
    c.ack(res.ROUTE, ["r"])
    (final,) = c.flush()  # not blocked by the unanswered EDS response
    assert final.type_url == res.CLUSTER and names_of(final) == ["z"]
