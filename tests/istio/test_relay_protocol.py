"""Sans-I/O relay state: subscriptions follow the config, verdicts pass upstream."""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType

from xds_server import resources as res
from xds_server.istio.messages import to_messages
from xds_server.relay_protocol import UpstreamState


def _eds(name: str) -> bytes:
    return bytes(Cluster.from_dict({"name": name, "type": "EDS", "edsClusterConfig": {
        "edsConfig": {"ads": {}}, "serviceName": f"svc-{name}"}}))


def _static(name: str) -> bytes:
    return bytes(Cluster(name=name, type=ClusterDiscoveryType.STATIC))


def _listener(rds: str) -> bytes:
    msgs = to_messages({res.LISTENER: [{"name": "l", "address": {"socketAddress": {
        "address": "0.0.0.0", "portValue": 80}}, "filterChains": [{"filters": [{
            "name": "hcm", "typedConfig": {"@type": res.HCM_URL, "statPrefix": "x",
                                           "rds": {"routeConfigName": rds, "configSource": {"ads": {}}},
                                           "httpFilters": []}}]}]}]})
    return bytes(msgs[res.LISTENER][0])


def test_first_requests_are_wildcard_cds_and_lds() -> None:
    reqs = UpstreamState().start()
    assert [(r.type_url, r.names, r.version) for r in reqs] == [(res.CLUSTER, (), ""),
                                                                  (res.LISTENER, (), "")]


def test_eds_and_rds_names_follow_clusters_and_listeners() -> None:
    st = UpstreamState()
    st.start()
    reqs = st.receive(res.CLUSTER, "v1", "n1", [(res.CLUSTER, _eds("a")), (res.CLUSTER, _static("b"))])
    assert [(r.type_url, r.names, r.nonce) for r in reqs] == [(res.ENDPOINT, ("svc-a",), "")]
    reqs = st.receive(res.LISTENER, "v1", "n2", [(res.LISTENER, _listener("rc80"))])
    assert [(r.type_url, r.names) for r in reqs] == [(res.ROUTE, ("rc80",))]
    assert st.receive(res.CLUSTER, "v2", "n3", [(res.CLUSTER, _eds("a"))]) == []  # same names
    assert {t.rsplit(".", 1)[-1] for t in st.resources()} == {"Cluster", "Listener"}


def test_sidecar_verdict_becomes_upstream_ack_or_nack() -> None:
    st = UpstreamState()
    st.receive(res.CLUSTER, "v1", "n1", [(res.CLUSTER, _static("a"))])
    ack = st.verdict(res.CLUSTER, None)
    assert ack is not None and (ack.version, ack.nonce, ack.error) == ("v1", "n1", "")
    assert st.verdict(res.CLUSTER, None) is None  # nothing pending any more
    st.receive(res.CLUSTER, "v2", "n2", [(res.CLUSTER, _static("a"))])
    nack = st.verdict(res.CLUSTER, "envoy says no")
    # A NACK keeps the last ACKed version and carries the sidecar's error.
    assert nack is not None and (nack.version, nack.nonce, nack.error) == ("v1", "n2", "envoy says no")
    assert [r.version for r in st.start() if r.type_url == res.CLUSTER] == ["v1"]  # on reconnect


def test_undecodable_response_is_nacked_at_once() -> None:
    st = UpstreamState()
    (req,) = st.receive(res.CLUSTER, "v1", "n1", [(res.LISTENER, _listener("x"))])
    assert req.error and req.nonce == "n1" and st.generation == 0
