"""The residual of clusters whose outlier detection the kernel owns (rule 3).

Called by `fastpath.residual.residual` when the kernel owns the node's
stateful policy (the agent runs its plan). One detector per cluster and node:
the kernel's (`fastpath.agent_outlier.OutlierKeeper`, `dp_outlier.h`). So,
in the node's residual, for every KERNEL cluster with outlier detection:

* the Cluster loses `outlier_detection`: Envoy's own detector would count
  the same host a second time (over the requests the kernel hands it) and
  eject on its own count;
* every outbound HCM with a route to such a cluster gets a gRPC access log
  (`envoy.access_loggers.http_grpc`, to the control plane through the
  bootstrap's xDS cluster, ALS_CLUSTER) on its router filter's `upstream_log`:
  one entry per upstream attempt, with that attempt's host and the status the
  upstream answered, as Envoy's detector counts them (a 503 retried on
  another host is counted for the host that answered it; `local_reply_config`
  never changes what is counted); they reach the kernel's detector
  (`fastpath.als` -> `OutlierKeeper.count_envoy`), counted by the same rule;
  and the same logger on the HCM's `access_log`, filtered to requests flagged
  UT (upstream timeout; `timeout_logger`): a route timeout's attempt entry has
  no status and no flag, the request's entry names its host (fastpath.als
  pairs them: RouteTimeouts); requests that did not time out are not logged;
* on such an HCM whose internal_address_config names clients (Envoy honours
  their x-envoy-upstream-rq-timeout-alt-response: its detector then counts
  every timeout of the request as 204), a set_filter_state filter just
  before the router keeps that header, which the router removes, as the
  filter state ALT_STATE shared with the upstream, and both loggers log it
  (`alt_state`): fastpath.als reads a per-try timeout's code from it;
* the hosts out of the kernel's LB view come to Envoy as EDS UNHEALTHY
  (xds_server.eds_health, at publish time), so Envoy skips them too.

A node id that names no IP (`node_ip`) changes nothing: fastpath.als would
refuse its stream, so the logger would cost Envoy throughput for nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from fastpath import envoy_model as em
from fastpath.plan import ClusterAction, Direction, KernelPlan, ListenerPlan, Verdict
from fastpath.request_id import internal_clients
from xds_server.bootstrap import XDS_CLUSTER

ALS_CLUSTER = XDS_CLUSTER  # the sidecar bootstrap's xDS cluster (Istio's name; mesh.envoyconf)
ALS_LOG_NAME = "l7fp_outlier"
ALS_NAME = "l7fp.outlier_als"
ALS_TIMEOUT_NAME = "l7fp.outlier_als_route_timeout"
# Envoy sends a batch when it holds buffer_size_bytes or every flush interval:
# Envoy's responses reach the kernel's detector at most 10 ms late (plus the
# agent's reading). Unbatched (0 bytes: one gRPC message per response) cost
# 2-3x the latency through Envoy here (benchmarks.als_cost, docs/fastpath.md).
ALS_BUFFER_BYTES = 16384
ALS_FLUSH = "0.01s"
# The filter state that carries a request's x-envoy-upstream-rq-timeout-alt-response
# to the access log (`alt_state_filter`, fastpath.als)
ALT_STATE = "l7fp.rq_alt"
ALT_FILTER_NAME = "l7fp.rq_alt"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ROUTER_NAME = "envoy.filters.http.router"
_ALS_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
_SET_STATE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config"


def owned_clusters(plan: KernelPlan) -> set[str]:
    """Clusters whose outlier detection the kernel owns on both paths: KERNEL,
    with outlier detection, `type: EDS` (the kernel's LB view reaches Envoy as
    EDS health; a cluster with inline endpoints keeps Envoy's detector for
    Envoy's path, the kernel's counts its own path: agent_outlier.needs_outlier)."""
    return {c.name for c in plan.clusters
            if c.outlier is not None and c.verdict is Verdict.KERNEL and c.eds_name is not None}


def node_ip(node_id: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP a sidecar node id names (`sidecar~IP~...`), None: none. The
    only peer fastpath.als accepts the node's stream from."""
    parts = node_id.split("~")
    try:
        return ipaddress.ip_address(parts[1]) if len(parts) > 2 else None
    except ValueError:
        return None


def logs_to_als(plan: Any) -> bool:
    """The residual of the node that runs `plan` has the logger (`apply`)."""
    return isinstance(plan, KernelPlan) and bool(owned_clusters(plan)) \
        and node_ip(plan.node_id) is not None


def without_als(res: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """`res` whose listeners have no logger of ours (new copies where changed):
    the server's `set_access_log_off` for a node whose stream never came."""
    out = dict(res)
    out[em.LISTENER] = [_without_als(m) for m in res.get(em.LISTENER, [])]
    return out


def _without_als(msg: Any) -> Any:
    lis = em.to_json(msg)
    changed = False
    for chain in _chains(lis):
        for f in chain.get("filters", []):
            hcm = f.get("typedConfig", {})
            changed |= _drop(hcm, "accessLog", ALS_TIMEOUT_NAME)
            changed |= _drop(hcm, "httpFilters", ALT_FILTER_NAME)
            for router in filter(_is_router, hcm.get("httpFilters", [])):
                changed |= _drop(router.get("typedConfig", {}), "upstreamLog", ALS_NAME)
    return em.from_json(em.LISTENER, lis) if changed else msg


def _drop(cfg: dict[str, Any], key: str, name: str) -> bool:
    """Remove the loggers named `name` from `cfg[key]`; True if any was there."""
    logs = cfg.get(key, [])
    kept = [x for x in logs if x.get("name") != name]
    if len(kept) == len(logs):
        return False
    cfg[key] = kept
    return True


def als_logger() -> dict[str, Any]:
    """The router's upstream_log entry (proto JSON) that sends the upstream
    responses Envoy gets to the agent."""
    return {"name": ALS_NAME, "typedConfig": {
        "@type": _ALS_TYPE,
        "commonConfig": {"logName": ALS_LOG_NAME, "transportApiVersion": "V3",
                         "grpcService": {"envoyGrpc": {"clusterName": ALS_CLUSTER}},
                         "bufferSizeBytes": ALS_BUFFER_BYTES, "bufferFlushInterval": ALS_FLUSH}}}


def alt_state(log: dict[str, Any]) -> dict[str, Any]:
    """Logger `log` (als_logger's form) that also logs the filter state ALT_STATE."""
    out = {**log, "typedConfig": {**log["typedConfig"]}}
    common = out["typedConfig"]["commonConfig"] = dict(out["typedConfig"]["commonConfig"])
    common["filterStateObjectsToLog"] = [ALT_STATE]
    return out


def alt_state_filter() -> dict[str, Any]:
    """The HTTP filter (proto JSON) that goes just before the router of an HCM
    with internal clients: the request's x-envoy-upstream-rq-timeout-alt-response
    (present only where Envoy honours it: the HCM strips it from the other
    clients; the router reads and removes it) into the filter state
    ALT_STATE, shared with the upstream: the router's upstream_log entries
    carry it too (seen with Envoy 1.40; not shared, they did not)."""
    return {"name": ALT_FILTER_NAME, "typedConfig": {"@type": _SET_STATE_TYPE, "onRequestHeaders": [{
        "objectKey": ALT_STATE, "factoryKey": "envoy.string", "skipIfEmpty": True,
        "sharedWithUpstream": "ONCE", "formatString": {"omitEmptyValues": True, "textFormatSource": {
            "inlineString": "%REQ(x-envoy-upstream-rq-timeout-alt-response)%"}}}]}}


def timeout_logger(router_log: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HCM's access_log entry (proto JSON): the router's logger
    (`router_log`, default als_logger()) for the requests flagged UT only (a
    route or per-try timeout: fastpath.als counts the route timeouts; a
    per-try one is counted from its attempt's entry). The same commonConfig as
    the router's, so Envoy sends both on one stream per worker (its logger
    cache is keyed by that config): fastpath.als pairs an attempt's entry
    with its request's on that stream."""
    log = dict(router_log or als_logger())
    log["name"] = ALS_TIMEOUT_NAME
    log["filter"] = {"responseFlagFilter": {"flags": ["UT"]}}
    return log


def apply(out: dict[str, list[Any]], plan: KernelPlan) -> None:
    """Change the residual `out` (type URL -> messages) in place, as the module says."""
    owned = owned_clusters(plan)
    if not owned or node_ip(plan.node_id) is None:
        return
    out[em.CLUSTER] = [_without_detector(m, owned) for m in out.get(em.CLUSTER, [])]
    outbound = {lp.name.split("#")[0] for lp in plan.listeners
                if lp.direction is Direction.OUTBOUND and _reaches(lp, owned)}
    out[em.LISTENER] = [_with_als(m) if em.to_json(m).get("name") in outbound else m
                        for m in out.get(em.LISTENER, [])]


def _reaches(lp: ListenerPlan, owned: set[str]) -> bool:
    """A route of `lp` (KERNEL or not: the kernel hands any request to Envoy)
    names an owned cluster: only these listeners pay for the access log."""
    return any(isinstance(r.action, ClusterAction) and any(w.name in owned for w in r.action.clusters)
               for vh in lp.virtual_hosts for r in vh.routes)


def _without_detector(msg: Any, owned: set[str]) -> Any:
    js = em.to_json(msg)
    if js.get("name") not in owned or "outlierDetection" not in js:
        return msg
    del js["outlierDetection"]
    return em.from_json(em.CLUSTER, js)


def _with_als(msg: Any) -> Any:
    lis = em.to_json(msg)
    changed = False
    for chain in _chains(lis):
        for f in chain.get("filters", []):
            hcm = f.get("typedConfig", {})
            if em.type_name(hcm.get("@type", "")) == em.HCM:
                changed |= hcm_with_als(hcm)
    return em.from_json(em.LISTENER, lis) if changed else msg


def hcm_with_als(hcm: dict[str, Any]) -> bool:
    """Add the loggers (and, with internal clients, alt_state_filter) to HCM
    proto JSON `hcm` in place; True if anything was added. Callers:
    `_with_als`, tests/xds/test_als.py (a real Envoy with this HCM)."""
    alt = internal_clients(hcm)
    log = alt_state(als_logger()) if alt else als_logger()
    changed = False
    filters = hcm.get("httpFilters", [])
    for i, router in enumerate(filters):
        if not _is_router(router):
            continue
        if alt and not any(x.get("name") == ALT_FILTER_NAME for x in filters[:i]):
            filters.insert(i, alt_state_filter())  # the router's request headers, as it reads them
            changed = True
        logs = router.setdefault("typedConfig", {"@type": ROUTER_TYPE}).setdefault("upstreamLog", [])
        if not any(x.get("name") == ALS_NAME for x in logs):
            logs.append(log)
            changed = True
        break
    hlogs = hcm.setdefault("accessLog", [])
    if not any(x.get("name") == ALS_TIMEOUT_NAME for x in hlogs):
        hlogs.append(timeout_logger(log))
        changed = True
    return changed


def _is_router(f: dict[str, Any]) -> bool:
    """An HCM http filter that is the router (by its config type, else its name)."""
    t = f.get("typedConfig", {}).get("@type")
    return t == ROUTER_TYPE if t else f.get("name") == ROUTER_NAME


def _chains(lis: dict[str, Any]) -> Sequence[dict[str, Any]]:
    return [*lis.get("filterChains", []), *([lis["defaultFilterChain"]] if "defaultFilterChain" in lis else [])]
