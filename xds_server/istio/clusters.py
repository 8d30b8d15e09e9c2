"""Services + DestinationRules -> Envoy clusters and endpoints, istiod-style.

Called by `xds_server.istio.sidecar`. Cluster names follow Istio:
`outbound|PORT|SUBSET|HOST`; subsets become clusters whose endpoints are
the service's endpoints carrying the subset labels. Output is Envoy JSON dicts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from .objects import Obj, ObjectSet, Warnings, as_list, check_fields, exported_to
from .registry import Endpoint, Port, Registry, Service
from .routes import duration

MAX = 4294967295
HTTP2 = frozenset({"http2", "grpc", "grpc-web"})
TP_FIELDS = {"loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings",
             "tunnel", "proxyProtocol"}
# istiod's defaultLBAlgorithm(): LEAST_REQUEST unless its legacy flag
# (ENABLE_LEGACY_LB_ALGORITHM_DEFAULT) asks for ROUND_ROBIN; UNSPECIFIED, an
# unknown `simple` and a cluster with no DestinationRule get it.
DEFAULT_LB = "LEAST_REQUEST"
LB = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
      "RANDOM": "RANDOM", "UNSPECIFIED": DEFAULT_LB}


def cluster_name(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def find_rule(objs: ObjectSet, reg: Registry, svc: Service, client_ns: str) -> Obj | None:
    """The DestinationRule for `svc`: client namespace first, then the service's, then any."""
    candidates = []
    for o in objs.of("DestinationRule"):
        if not exported_to(o, client_ns):
            continue
        if o.spec.get("workloadSelector"):
            objs.warnings.add(o, "spec.workloadSelector", "DestinationRule workload selection is "
                              "unsupported; the rule applies to every client")
        host = reg.fqdn(str(o.spec.get("host", "")), o.namespace)
        if host == svc.hostname or fnmatch.fnmatchcase(svc.hostname, host):
            candidates.append(o)
    for ns in (client_ns, svc.namespace):
        for o in candidates:
            if o.namespace == ns:
                return o
    return candidates[0] if candidates else None


def service_clusters(objs: ObjectSet, reg: Registry, svc: Service, client_ns: str,
                     hash_policies: dict[str, list[dict[str, Any]]]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(clusters, load assignments) of every port and subset of `svc`.

    Fills `hash_policies` (cluster name -> route hashPolicy) for consistentHash.
    """
    w = objs.warnings
    dr = find_rule(objs, reg, svc, client_ns)
    spec = check_fields(w, dr, "spec", dr.spec, {"host", "trafficPolicy", "subsets", "exportTo",
                                                 "workloadSelector"}) if dr else {}
    top = spec.get("trafficPolicy") or {}
    subsets: list[tuple[str, Mapping[str, str], Mapping[str, Any]]] = [("", {}, {})]
    if dr is not None:
        for i, sub in enumerate(as_list(w, dr, "spec.subsets", spec.get("subsets"))):
            sub = check_fields(w, dr, f"spec.subsets[{i}]", sub, {"name", "labels", "trafficPolicy"})
            subsets.append((str(sub.get("name")), sub.get("labels") or {}, sub.get("trafficPolicy") or {}))
    clusters, cla = [], []
    for port in svc.ports:
        for subset, labels, sub_tp in subsets:
            name = cluster_name(port.number, subset, svc.hostname)
            path = "spec.trafficPolicy" if not subset else f"spec.subsets[{subset}].trafficPolicy"
            tp = _merge(_for_port(top, port.number), _for_port(sub_tp, port.number))
            c = _cluster(w, dr, path, name, svc, port, tp, hash_policies)
            clusters.append(c)
            if c["type"] == "EDS":
                cla.append(_assignment(name, svc, port, labels))
    return clusters, cla


def _for_port(tp: Mapping[str, Any], port: int) -> dict[str, Any]:
    out = {k: v for k, v in tp.items() if k != "portLevelSettings"}
    for pls in tp.get("portLevelSettings") or []:
        if int((pls.get("port") or {}).get("number", -1)) == port:
            out.update({k: v for k, v in pls.items() if k != "port"})
    return out


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    out.update(over)
    return out


def _cluster(w: Warnings, dr: Obj | None, path: str, name: str, svc: Service, port: Port,
             tp: Mapping[str, Any], hash_policies: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "connectTimeout": "10s", "lbPolicy": DEFAULT_LB,
                         "circuitBreakers": {"thresholds": [{"maxConnections": MAX, "maxPendingRequests": MAX,
                                                             "maxRequests": MAX, "maxRetries": MAX}]}}
    if svc.resolution == "PASSTHROUGH":
        c.update(type="ORIGINAL_DST", lbPolicy="CLUSTER_PROVIDED")
        c.pop("circuitBreakers")
    elif svc.resolution == "DNS":
        c.update(type="STRICT_DNS", loadAssignment=_assignment(name, svc, port, {}))
    else:
        c.update(type="EDS", edsClusterConfig={"edsConfig": {"ads": {}, "resourceApiVersion": "V3"},
                                              "serviceName": name})
    if port.protocol in HTTP2:
        c["typedExtensionProtocolOptions"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicitHttpConfig": {"http2ProtocolOptions": {}}}}
    if dr is not None and tp:
        _traffic_policy(w, dr, path, tp, c, hash_policies)
    return c


def _traffic_policy(w: Warnings, dr: Obj, path: str, tp: Mapping[str, Any], c: dict[str, Any],
                    hash_policies: dict[str, list[dict[str, Any]]]) -> None:
    tp = check_fields(w, dr, path, tp, TP_FIELDS | {"port"})
    lb = check_fields(w, dr, f"{path}.loadBalancer", tp.get("loadBalancer"),
                      {"simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"})
    if "simple" in lb:
        simple = str(lb["simple"]).upper()
        if simple == "PASSTHROUGH":
            c.update(type="ORIGINAL_DST", lbPolicy="CLUSTER_PROVIDED")
            c.pop("edsClusterConfig", None)
        elif simple in LB:
            c["lbPolicy"] = LB[simple]
        else:
            w.add(dr, f"{path}.loadBalancer.simple", f"{simple!r} unknown; {DEFAULT_LB} used")
    if "consistentHash" in lb:
        c["lbPolicy"] = "RING_HASH"
        hash_policies[c["name"]] = _hash_policy(w, dr, f"{path}.loadBalancer.consistentHash",
                                                lb["consistentHash"])
    for key in ("localityLbSetting", "warmupDurationSecs", "warmup"):
        if key in lb:
            w.add(dr, f"{path}.loadBalancer.{key}", "unsupported (single locality); ignored")
    _connection_pool(w, dr, f"{path}.connectionPool", tp.get("connectionPool"), c)
    if "outlierDetection" in tp:
        c["outlierDetection"] = _outlier(w, dr, f"{path}.outlierDetection", tp["outlierDetection"])
        c.setdefault("commonLbConfig", {})["healthyPanicThreshold"] = \
            _panic_threshold(tp["outlierDetection"])
    tls = tp.get("tls")
    if tls and str(tls.get("mode", "")).upper() not in ("DISABLE", ""):
        w.add(dr, f"{path}.tls.mode", f"{tls.get('mode')}: upstream TLS is not implemented "
              "(no certificates in L7FP's mesh); plaintext is used")
    for key in ("tunnel", "proxyProtocol"):
        if key in tp:
            w.add(dr, f"{path}.{key}", "unsupported; ignored")


def _hash_policy(w: Warnings, dr: Obj, path: str, spec: Any) -> list[dict[str, Any]]:
    spec = check_fields(w, dr, path, spec, {"httpHeaderName", "httpCookie", "useSourceIp",
                                            "httpQueryParameterName", "ringHash", "minimumRingSize",
                                            "maglev"})
    if "httpHeaderName" in spec:
        return [{"header": {"headerName": str(spec["httpHeaderName"]).lower()}}]
    if "httpCookie" in spec:
        ck = spec["httpCookie"] or {}
        cookie: dict[str, Any] = {"name": str(ck.get("name", ""))}
        if "ttl" in ck:
            cookie["ttl"] = duration(ck["ttl"])
        if "path" in ck:
            cookie["path"] = str(ck["path"])
        return [{"cookie": cookie}]
    if "httpQueryParameterName" in spec:
        return [{"queryParameter": {"name": str(spec["httpQueryParameterName"])}}]
    return [{"connectionProperties": {"sourceIp": True}}]


def _connection_pool(w: Warnings, dr: Obj, path: str, spec: Any, c: dict[str, Any]) -> None:
    spec = check_fields(w, dr, path, spec, {"tcp", "http"})
    th = c.setdefault("circuitBreakers", {"thresholds": [{}]})["thresholds"][0]
    tcp = check_fields(w, dr, f"{path}.tcp", spec.get("tcp"),
                       {"maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration",
                        "idleTimeout"})
    if "maxConnections" in tcp:
        th["maxConnections"] = int(tcp["maxConnections"])
    if "connectTimeout" in tcp:
        c["connectTimeout"] = duration(tcp["connectTimeout"])
    for key in ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"):
        if key in tcp:
            w.add(dr, f"{path}.tcp.{key}", "unsupported; ignored")
    http = check_fields(w, dr, f"{path}.http", spec.get("http"),
                        {"http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
                         "maxRetries", "idleTimeout", "h2UpgradePolicy", "useClientProtocol",
                         "maxConcurrentStreams"})
    for src, dst in (("http1MaxPendingRequests", "maxPendingRequests"),
                     ("http2MaxRequests", "maxRequests"), ("maxRetries", "maxRetries")):
        if src in http:
            th[dst] = int(http[src])
    if "maxRequestsPerConnection" in http or "idleTimeout" in http:
        opts: dict[str, Any] = {}
        if "maxRequestsPerConnection" in http:
            opts["maxRequestsPerConnection"] = int(http["maxRequestsPerConnection"])
        if "idleTimeout" in http:
            opts["idleTimeout"] = duration(http["idleTimeout"])
        proto = c.setdefault("typedExtensionProtocolOptions", {}).setdefault(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"httpProtocolOptions": {}}})
        proto["commonHttpProtocolOptions"] = opts
    for key in ("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"):
        if key in http:
            w.add(dr, f"{path}.http.{key}", "unsupported; ignored")


def _outlier(w: Warnings, dr: Obj, path: str, spec: Any) -> dict[str, Any]:
    """istiod's applyOutlierDetection: success rate off; a consecutive count
    enforced (100 %) when given and > 0, off when 0, Envoy's default (5, 100 %
    for 5xx) when absent. The panic threshold is `_panic_threshold`'s."""
    spec = check_fields(w, dr, path, spec, {
        "consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
        "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
        "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures"})
    out: dict[str, Any] = {"enforcingSuccessRate": 0}
    five = spec.get("consecutive5xxErrors", spec.get("consecutiveErrors"))
    if five is not None:
        out.update(consecutive5xx=int(five), enforcingConsecutive5xx=100 if int(five) else 0)
    if "consecutiveGatewayErrors" in spec:
        gw = int(spec["consecutiveGatewayErrors"])
        out.update(consecutiveGatewayFailure=gw, enforcingConsecutiveGatewayFailure=100 if gw else 0)
    if "interval" in spec:
        out["interval"] = duration(spec["interval"])
    if "baseEjectionTime" in spec:
        out["baseEjectionTime"] = duration(spec["baseEjectionTime"])
    if int(spec.get("maxEjectionPercent", 0)) > 0:
        out["maxEjectionPercent"] = int(spec["maxEjectionPercent"])
    if spec.get("splitExternalLocalOriginErrors"):
        out["splitExternalLocalOriginErrors"] = True
        if int(spec.get("consecutiveLocalOriginFailures", 0)) > 0:
            out["consecutiveLocalOriginFailure"] = int(spec["consecutiveLocalOriginFailures"])
            out["enforcingConsecutiveLocalOriginFailure"] = 100
        out["enforcingLocalOriginSuccessRate"] = 0
    return out


def _panic_threshold(spec: Any) -> dict[str, Any]:
    """istiod sets healthy_panic_threshold to minHealthPercent (default 0: no
    panic, "not typically applicable in k8s environments with few pods")."""
    return {"value": float(spec.get("minHealthPercent", 0) if isinstance(spec, dict) else 0)}


def _assignment(name: str, svc: Service, port: Port, labels: Mapping[str, str]) -> dict[str, Any]:
    eps = [e for e in svc.endpoints if all(e.labels.get(k) == v for k, v in labels.items())]
    return {"clusterName": name, "endpoints": [{"lbEndpoints": [_lb_endpoint(e, port) for e in eps]}]}


def _lb_endpoint(e: Endpoint, port: Port) -> dict[str, Any]:
    number = e.ports.get(port.number) or port.target or port.number
    return {"endpoint": {"address": {"socketAddress": {"address": e.ip, "portValue": number}}}}
