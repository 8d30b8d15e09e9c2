"""The residual of a node whose kernel owns a cluster's outlier detection
(fastpath.residual_outlier, NAME=odown): Envoy's detector removed from that
cluster only, the ALS upstream log on the outbound HCM's router and the
UT-filtered one on that HCM, nothing changed when
Envoy owns the node (envoy_residual). The real Envoy's side:
tests/xds/test_als.py and tests/kernel_differential/test_outlier_mesh.py."""

from __future__ import annotations

from typing import Any

from fastpath import envoy_model as em
from fastpath import residual_outlier as ro
from fastpath.split import split_snapshot
from xds_server import resources as res

HCM = "type.googleapis.com/" + em.HCM
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def cluster(name: str, od: dict[str, Any] | None, eds: str | None = None) -> list[dict[str, Any]]:
    """A ROUND_ROBIN cluster of two hosts: `type: EDS` with its CLA named `eds`
    (eds_cluster_config service_name) when given, else STATIC (inline)."""
    cla = {"cluster_name": eds or name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": f"198.18.0.{i + 2}", "port_value": 80}}}}
        for i in range(2)]}]}
    c: dict[str, Any] = {"@type": res.CLUSTER, "name": name, "connect_timeout": "1s",
                         "lb_policy": "ROUND_ROBIN"}
    if od is not None:
        c["outlier_detection"] = od
    if eds is None:
        return [{**c, "type": "STATIC", "load_assignment": cla}]
    c |= {"type": "EDS", "eds_cluster_config": {"service_name": eds, "eds_config": {"ads": {}}}}
    return [c, {"@type": res.ENDPOINT, **cla}]


def listener(name: str, port: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@type": res.LISTENER, "name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                "@type": HCM, "stat_prefix": name,
                "route_config": {"name": f"rc{port}", "virtual_hosts": [
                    {"name": "v", "domains": ["*"], "routes": routes}]},
                "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}]}}]}]}


def resources() -> dict[str, list[Any]]:
    routes = [{"match": {"prefix": "/a"}, "route": {"cluster": "od"}},
              {"match": {"prefix": "/s"}, "route": {"cluster": "inline"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "plain"}}]
    other = [{"match": {"prefix": "/"}, "route": {"cluster": "plain"}}]
    od = {"interval": "1s", "maxEjectionPercent": 50}
    out: dict[str, list[Any]] = {}
    docs = [*cluster("od", od, eds="outbound|80||od"), *cluster("inline", od),
            *cluster("plain", None, eds="plain"), listener("out", 9000, routes),
            listener("other", 9100, other)]
    for i, d in enumerate(docs):
        out.setdefault(d["@type"], []).append(res.parse_resource(d, f"r[{i}]"))
    return out


def test_kernel_owner_drops_envoys_detector_and_logs_to_the_agent() -> None:
    r = split_snapshot("sidecar~198.18.0.9~c-0.t~t.svc.cluster.local", resources())
    assert ro.owned_clusters(r.plan) == {"od"}, [(c.name, c.verdict, c.reason) for c in r.plan.clusters]
    owned = {em.to_json(m)["name"]: em.to_json(m) for m in r.residual[res.CLUSTER]}
    kept = {em.to_json(m)["name"]: em.to_json(m) for m in r.envoy_residual[res.CLUSTER]}
    assert "outlierDetection" not in owned["od"] and "outlierDetection" in kept["od"]
    # inline endpoints: EDS health cannot carry the kernel's view, Envoy keeps its detector
    assert "outlierDetection" in owned["inline"]
    od = next(c for c in r.plan.clusters if c.name == "od")
    assert od.eds_name == "outbound|80||od"  # the CLA the EDS overlay marks
    lis, other = [em.to_json(m) for m in r.residual[res.LISTENER]]
    assert not _logs(other)  # no od route: no logger
    (log,) = _logs(lis)  # on the router: one entry per upstream attempt
    # on the HCM: the same sink for requests flagged UT only (route timeouts)
    (ut,) = lis["filterChains"][0]["filters"][0]["typedConfig"]["accessLog"]
    assert ut["name"] == ro.ALS_TIMEOUT_NAME and ut["filter"] == {"responseFlagFilter": {"flags": ["UT"]}}
    assert ut["typedConfig"] == log["typedConfig"]  # one logger, one stream per worker: paired
    assert not _hcm_logs(other)
    common = log["typedConfig"]["commonConfig"]
    assert common["grpcService"]["envoyGrpc"]["clusterName"] == ro.ALS_CLUSTER
    assert em.duration_ms(common["bufferFlushInterval"]) == 10  # batches: at most 10 ms late
    lis0, _ = [em.to_json(m) for m in r.envoy_residual[res.LISTENER]]
    assert not _logs(lis0)
    again = {t: list(v) for t, v in r.residual.items()}
    ro.apply(again, r.plan)  # idempotent: one logger
    lis2, _ = [em.to_json(m) for m in again[res.LISTENER]]
    assert len(_logs(lis2)) == 1 and len(_hcm_logs(lis2)) == 1
    off = [em.to_json(m) for m in ro.without_als(r.residual)[res.LISTENER]]
    assert not any(_logs(x) or _hcm_logs(x) for x in off)  # given up: both go


def _hcm_logs(lis: dict[str, Any]) -> list[Any]:
    """The HCM's access_log entries of listener JSON `lis`."""
    return list(lis["filterChains"][0]["filters"][0]["typedConfig"].get("accessLog", []))


def _logs(lis: dict[str, Any]) -> list[Any]:
    """The router's upstream_log entries of listener JSON `lis`."""
    hcm = lis["filterChains"][0]["filters"][0]["typedConfig"]
    (router,) = hcm["httpFilters"]
    return list(router["typedConfig"].get("upstreamLog", []))


def test_a_node_id_without_ip_gets_no_logger() -> None:
    """fastpath.als would refuse its stream (no IP to check the peer
    against): the logger would only cost; Envoy keeps its detector."""
    r = split_snapshot("demo", resources())
    assert ro.owned_clusters(r.plan) == {"od"}
    assert not any(_logs(em.to_json(m)) for m in r.residual[res.LISTENER])
    owned = {em.to_json(m)["name"]: em.to_json(m) for m in r.residual[res.CLUSTER]}
    assert "outlierDetection" in owned["od"]


def test_an_hcm_with_internal_clients_keeps_the_alt_response_for_the_log() -> None:
    """Envoy honours x-envoy-upstream-rq-timeout-alt-response only from the
    clients an HCM's internal_address_config names, and its detector then
    counts each timeout of the request as 204; the router removes the header.
    Such an HCM gets alt_state_filter just before its router and both loggers
    log its filter state (fastpath.als reads a per-try timeout's code from
    it); other HCMs get neither. Idempotent; a given-up node loses it too."""
    docs = resources()
    lis = next(m for m in docs[res.LISTENER] if em.to_json(m)["name"] == "out")
    js = em.to_json(lis)
    js["filterChains"][0]["filters"][0]["typedConfig"]["internalAddressConfig"] = {
        "cidrRanges": [{"addressPrefix": "198.18.0.0", "prefixLen": 15}]}
    docs[res.LISTENER] = [em.from_json(em.LISTENER, js) if m is lis else m for m in docs[res.LISTENER]]
    r = split_snapshot("sidecar~198.18.0.9~c-0.t~t.svc.cluster.local", docs)
    out = em.to_json(r.residual[res.LISTENER][0])
    hcm = out["filterChains"][0]["filters"][0]["typedConfig"]
    assert [f["name"] for f in hcm["httpFilters"]] == [ro.ALT_FILTER_NAME, "router"]
    (log,) = hcm["httpFilters"][1]["typedConfig"]["upstreamLog"]
    (ut,) = hcm["accessLog"]
    assert log["typedConfig"]["commonConfig"]["filterStateObjectsToLog"] == [ro.ALT_STATE]
    assert ut["typedConfig"] == log["typedConfig"]  # still one stream for the pair
    state = hcm["httpFilters"][0]["typedConfig"]["onRequestHeaders"][0]
    assert state["sharedWithUpstream"] == "ONCE" and state["skipIfEmpty"]
    again = {t: list(v) for t, v in r.residual.items()}
    ro.apply(again, r.plan)
    assert em.to_json(again[res.LISTENER][0]) == out
    off = em.to_json(ro.without_als(r.residual)[res.LISTENER][0])
    assert [f["name"] for f in off["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"]] == [
        "router"]
    plain = em.to_json(split_snapshot("sidecar~198.18.0.9~c-0.t~t.svc.cluster.local",
                                      resources()).residual[res.LISTENER][0])
    assert "filterStateObjectsToLog" not in _logs(plain)[0]["typedConfig"]["commonConfig"]
