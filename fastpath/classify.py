"""One node's resources (proto-JSON dicts) -> KernelPlan listeners and clusters.

Called by `fastpath.split.split_snapshot` and by `l7fp split` (through
`fastpath.coverage`); owned by the split. Listener-wide needs (downstream TLS,
an ext_authz/JWT/Lua filter, RBAC the kernel can't evaluate, a shared rate-limit
bucket with an Envoy route) turn every route of that listener ENVOY, with the
reason, because the kernel must then hand all of that listener's requests to
Envoy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

from fastpath import outlier, request_id, tracing
from fastpath.bpf_structs import DEFAULT_KNOBS
from fastpath.classify_delay import listener_delay_reasons
from fastpath.classify_rbac import classify_rbac
from fastpath.classify_route import (
    HttpFilter,
    KernelCaps,
    RouteContext,
    classify_route_entries,
    fault_abort,
    filter_kind,
    local_rate_limit,
)
from fastpath.envoy_model import HCM, bool_field, duration_ms, type_name
from fastpath.plan import (
    SHARED_BUCKET_REASON,
    Cluster,
    Direction,
    Endpoint,
    HeaderValue,
    LbPolicy,
    ListenerPlan,
    PathKind,
    PathNormalization,
    Rbac,
    Route,
    Verdict,
    VirtualHost,
)
from xds_server.protojson import is_opaque, opaque_type, opaque_types

# The kernel's LEAST_REQUEST pick weighs this many endpoints of a cluster
# (L7FP_LR_EPS of bpf_src/include/l7fp_defs.h: in-flight counters per cluster).
LR_MAX_ENDPOINTS = DEFAULT_KNOBS["L7FP_LR_EPS"]
_LB = {"ROUND_ROBIN": LbPolicy.ROUND_ROBIN, "RANDOM": LbPolicy.RANDOM,
       "LEAST_REQUEST": LbPolicy.LEAST_REQUEST, "RING_HASH": LbPolicy.RING_HASH,
       "MAGLEV": LbPolicy.MAGLEV}


@dataclass(frozen=True)
class Resources:
    """Proto-JSON dicts of one node, by kind (names are the resources' names)."""

    listeners: list[dict[str, Any]]
    route_configs: dict[str, dict[str, Any]]
    clusters: list[dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]


def build(res: Resources, caps: KernelCaps | None = None, orphans: bool = False
          ) -> tuple[tuple[ListenerPlan, ...], tuple[Cluster, ...]]:
    """Listeners and clusters of the plan. ``orphans``: also route configs no
    listener references (as listener "(no listener)"), for `l7fp split` on RDS files."""
    caps = caps or KernelCaps()
    clusters = tuple(_safe_cluster(c, res.endpoints, caps) for c in res.clusters)
    by_name = {c.name: c for c in clusters}
    listeners: list[ListenerPlan] = []
    used: set[str] = set()
    for lis in res.listeners:
        for plan, rc_name in _safe_listener(lis, res, by_name, caps):
            listeners.append(plan)
            used.add(rc_name)
    if orphans:
        for name, rc in res.route_configs.items():
            if name not in used:
                ctx = RouteContext(by_name, [HttpFilter("router", "router", {})], caps)
                vhosts = _vhosts(rc, ctx)
                listeners.append(ListenerPlan("(no listener)", "0.0.0.0", 0, Direction.OUTBOUND,
                                              vhosts, route_config=name))
    return tuple(listeners), clusters


# A resource the classifier trips on (a shape it doesn't expect) must not take
# the whole node's split down: it becomes an ENVOY entry that says why.
def _safe_cluster(c: dict[str, Any], endpoints: dict[str, dict[str, Any]],
                  caps: KernelCaps) -> Cluster:
    try:
        return classify_cluster(c, endpoints, caps)
    except Exception as e:  # noqa: BLE001 - any classifier bug: Envoy keeps the cluster
        return Cluster(str(c.get("name", "")), LbPolicy.ROUND_ROBIN, (), verdict=Verdict.ENVOY,
                       reason=f"cannot classify: {type(e).__name__}: {e}")


def _safe_listener(lis: dict[str, Any], res: Resources, clusters: dict[str, Cluster],
                   caps: KernelCaps) -> list[tuple[ListenerPlan, str]]:
    try:
        return _listener(lis, res, clusters, caps)
    except Exception as e:  # noqa: BLE001 - any classifier bug: Envoy keeps the listener
        sa = lis.get("address", {}).get("socketAddress", {}) if isinstance(lis, dict) else {}
        plan = ListenerPlan(str(lis.get("name", "?")), str(sa.get("address", "0.0.0.0")),
                            int(sa.get("portValue", 0) or 0), _direction(lis, str(lis.get("name", ""))),
                            (), verdict=Verdict.ENVOY, reason=f"cannot classify: {type(e).__name__}: {e}")
        return [(plan, "")]


def _listener(lis: dict[str, Any], res: Resources, clusters: dict[str, Cluster],
              caps: KernelCaps) -> list[tuple[ListenerPlan, str]]:
    sa = lis.get("address", {}).get("socketAddress", {})
    address, port = str(sa.get("address", "0.0.0.0")), int(sa.get("portValue", 0))
    name = str(lis.get("name", f"{address}:{port}"))
    direction = _direction(lis, name)
    chains = list(lis.get("filterChains", []))
    if "defaultFilterChain" in lis:
        chains.append(lis["defaultFilterChain"])
    http_chains = [c for c in chains if _hcm(c) is not None]
    out = [(_opaque_hcm(name, address, port, direction, c), "") for c in chains if _is_opaque_hcm(c)]
    for i, chain in enumerate(http_chains):
        reasons = _chain_reasons(chain)
        cname = name if len(http_chains) == 1 else f"{name}#{chain.get('name', i)}"
        cport = int(chain.get("filterChainMatch", {}).get("destinationPort", port))
        hcm = _hcm(chain) or {}
        plan, rc_name = _http(cname, address, cport, direction, hcm, res, clusters, caps, reasons,
                              egress=lis.get("trafficDirection") == "OUTBOUND")
        out.append((plan, rc_name))
    return out


def _is_opaque_hcm(chain: dict[str, Any]) -> bool:
    return any(is_opaque(f.get("typedConfig")) and opaque_type(f["typedConfig"]) == HCM
               for f in chain.get("filters", []))


def _opaque_hcm(name: str, address: str, port: int, direction: Direction,
                chain: dict[str, Any]) -> ListenerPlan:
    """A chain whose HttpConnectionManager L7FP kept opaque (a field its proto
    library lacks): Envoy's as a whole; its routes are not read."""
    return ListenerPlan(f"{name}#{chain.get('name', 'opaque')}", address, port, direction, (),
                        verdict=Verdict.ENVOY,
                        reason="http_connection_manager unknown to L7FP (kept opaque for Envoy)")


def _direction(lis: dict[str, Any], name: str) -> Direction:
    td = lis.get("trafficDirection")
    if td == "INBOUND" or (td is None and "inbound" in name.lower()):
        return Direction.INBOUND
    return Direction.OUTBOUND


def _hcm(chain: dict[str, Any]) -> dict[str, Any] | None:
    for f in chain.get("filters", []):
        tc = f.get("typedConfig", {})
        if type_name(tc.get("@type", "")) == HCM:
            return tc  # type: ignore[no-any-return]
    return None


def _chain_reasons(chain: dict[str, Any]) -> list[str]:
    reasons = []
    if "transportSocket" in chain:
        reasons.append("downstream TLS termination (no TLS in the kernel)")
    fcm = chain.get("filterChainMatch", {})
    # The data path picks a listener by destination ip:port only; a chain that
    # Envoy selects on anything else (SNI, source, TLS) is Envoy's to pick.
    other = sorted(set(fcm) - {"destinationPort", "transportProtocol", "applicationProtocols"})
    if other:
        reasons.append(f"filter_chain_match on {', '.join(other)}")
    if fcm.get("transportProtocol", "raw_buffer") != "raw_buffer":
        reasons.append(f"filter chain for transport {fcm['transportProtocol']}")
    for f in chain.get("filters", []):
        kind = filter_kind(f)
        if kind != "http_connection_manager":
            reasons.append(f"network filter {kind}")
    return reasons


def _http(name: str, address: str, port: int, direction: Direction, hcm: dict[str, Any],
          res: Resources, clusters: dict[str, Cluster], caps: KernelCaps,
          reasons: list[str], egress: bool = False) -> tuple[ListenerPlan, str]:
    """One HCM filter chain's plan; `egress`: the listener's traffic_direction
    is OUTBOUND (what Envoy's tracing does with route decorators)."""
    filters = [HttpFilter(str(f.get("name", "")), filter_kind(f), f.get("typedConfig", {}),
                          bool(f.get("disabled", False))) for f in hcm.get("httpFilters", [])]
    limit, fault = None, None
    no_route_delay: list[str] = []  # the HCM's fault delay, for requests without a route
    rbacs: list[Rbac] = []
    order: list[str] = []  # enabled policy filters in chain order (Istio: DENY rbac, then ALLOW rbac)
    for f in filters:
        if f.disabled or f.kind not in ("rbac", "local_ratelimit", "fault") or is_opaque(f.config):
            continue  # an opaque one (config L7FP can't read) is charged to the routes
        if f.kind in order and f.kind != "rbac":
            reasons.append(f"several {f.kind} filters")
        if f.kind == "fault":
            fault, _ = fault_abort(f.config)  # its reasons are charged to the routes
            no_route_delay = listener_delay_reasons(f.config)
        elif f.kind == "rbac":
            one, more = classify_rbac(f.config)
            reasons += [f"listener RBAC: {r}" for r in more]
            if one is None:
                continue  # no rules (or LOG only): enforces nothing
            rbacs.append(one)
        elif f.kind == "local_ratelimit":
            limit, more = local_rate_limit(f.config)
            reasons += more
        order.append(f.kind)
    reasons += _hcm_reasons(hcm)
    reasons += tracing.hcm_reasons(hcm, caps.fault_runtime)
    if not any(f.kind == "router" for f in filters):
        # Envoy 1.40 accepts such an HCM and answers nothing (seen: 504 after the 5 min stream idle timeout)
        reasons.append("no router http filter (Envoy routes no request)")
    rc_name = hcm.get("rds", {}).get("routeConfigName", "")
    rc = hcm.get("routeConfig") or res.route_configs.get(rc_name)
    if rc is None:
        rc = {}
        if rc_name:
            reasons.append(f"route config {rc_name!r} not found")
    ctx = RouteContext(clusters, filters, caps, route_config=rc)
    vhosts = _vhosts(rc, ctx, trace=_trace_kind(hcm, direction, egress))
    if not _every_request_routed(vhosts):
        reasons += no_route_delay
    if limit is not None and any(r.verdict is Verdict.ENVOY for v in vhosts for r in v.routes):
        # One owner per bucket: Envoy keeps it, so every request must reach Envoy.
        reasons.append(SHARED_BUCKET_REASON)
    if reasons:
        why = "; ".join(dict.fromkeys(reasons))
        vhosts = tuple(replace(v, routes=tuple(_punt(r, why) for r in v.routes)) for v in vhosts)
    norm = PathNormalization(bool(hcm.get("normalizePath", False)), bool(hcm.get("mergeSlashes", False)),
                             str(hcm.get("pathWithEscapedSlashesAction", "KEEP_UNCHANGED")))
    plan = ListenerPlan(name, address, port, direction, vhosts, rc.get("name", rc_name),
                        rbacs[0] if rbacs else None, limit, norm,
                        Verdict.ENVOY if reasons else Verdict.KERNEL, "; ".join(dict.fromkeys(reasons)),
                        filter_order=tuple(order), fault_abort=fault, rbacs=tuple(rbacs),
                        use_remote_address=bool_field(hcm, "useRemoteAddress", False),
                        trace_sampling=tracing.sampling(hcm), trace_provider=tracing.provider(hcm),
                        trace_egress=egress and "tracing" in hcm, trace_overall=tracing.overall(hcm))
    return plan, str(rc.get("name", rc_name))


def _trace_kind(hcm: dict[str, Any], direction: Direction, egress: bool) -> str:
    """What Envoy's tracing does with route decorators on this HCM
    (_traced_route): "egress" (traffic_direction OUTBOUND), "inbound"
    (INBOUND), "ingress" (any other); "" without tracing."""
    if "tracing" not in hcm:
        return ""
    return "egress" if egress else "inbound" if direction is Direction.INBOUND else "ingress"


def _every_request_routed(vhosts: tuple[VirtualHost, ...]) -> bool:
    """True when no request the kernel decides can miss a route: a "*" virtual host
    catches every Host and every virtual host contains a route matching any path
    (prefix "/" without header, query or method matchers; anywhere in its list:
    the routes after it are unreachable, every request still has a route).
    Then the HCM-level fault delay of requests without a route
    (listener_delay_reasons) never applies. Found by `l7fp mesh audit`: the demo's `text` listener was ENVOY
    for it although its one route is such a catch-all."""
    def catch_all(r: Route) -> bool:
        m = r.match
        return (m.path_kind is PathKind.PREFIX and m.path in ("", "/") and not m.headers
                and not m.query_params and m.method is None and not m.grpc)
    return any("*" in v.domains for v in vhosts) and all(
        any(catch_all(r) for r in v.routes) for v in vhosts)


def _traced_route(r: dict[str, Any], ctx: RouteContext, trace: str) -> list[Route]:
    """The route's entries under HCM tracing (fastpath.tracing): ENVOY for a
    setting the kernel does not reproduce, else an OUTBOUND listener's
    propagated decorator becomes the route's first header add."""
    entries = classify_route_entries(r, ctx)
    if not trace:
        return entries
    why = "; ".join(tracing.route_reasons(r, egress=trace == "egress", inbound=trace == "inbound"))
    if why:
        return [_punt(e, why) for e in entries]
    op = tracing.decorator_operation(r)
    if not op or trace != "egress":
        return entries  # an INBOUND listener's decorator names its span only
    dec = HeaderValue("x-envoy-decorator-operation", op, append=True)
    return [replace(e, request_headers_to_add=(dec, *e.request_headers_to_add)) for e in entries]


def _punt(r: Route, why: str) -> Route:
    reason = why if r.verdict is Verdict.KERNEL else f"{why}; {r.reason}"
    return replace(r, verdict=Verdict.ENVOY, reason=reason)


# HCM settings that change what a request gets, beyond routing: the kernel
# doesn't replicate them, so the whole listener stays with Envoy.
_HCM_ENVOY_KEYS = ("scopedRoutes", "stripAnyHostPort", "stripMatchingHostPort", "localReplyConfig",
                   "via", "addUserAgent", "originalIpDetectionExtensions", "earlyHeaderMutationExtensions")
# Route-config / virtual-host fields whose effect the kernel reproduces or that
# have none on a request (stats, metadata); any other field needs Envoy.
_RC_KEYS = {"name", "virtualHosts", "requestHeadersToAdd", "requestHeadersToRemove",
            "responseHeadersToAdd", "responseHeadersToRemove", "validateClusters",
            "typedPerFilterConfig", "metadata", "maxDirectResponseBodySizeBytes"}
_VH_KEYS = {"name", "domains", "routes", "requireTls", "virtualClusters", "rateLimits",
            "requestHeadersToAdd", "requestHeadersToRemove", "responseHeadersToAdd",
            "responseHeadersToRemove", "cors", "typedPerFilterConfig", "retryPolicy", "metadata",
            "includeRequestAttemptCount", "includeAttemptCountInResponse"}


# The most a kernel-handled request head can have (bpf_src/datapath.h DP_HDR_MAX,
# the largest L7FP_MAX_HDR a synthesis may choose; docs/kernel-decision.md) and
# the most lines (request line included; more: Envoy).
KERNEL_HEAD_BYTES = 2048
KERNEL_HEAD_LINES = DEFAULT_KNOBS["L7FP_MAX_LINES"]


# HCM fields the split reads (checked in _hcm_reasons, request_id.hcm_reasons,
# tracing.hcm_reasons, the route tables) or that have no effect on what a
# request the kernel takes gets: connection and stream timers (Envoy's default
# stream idle timeout is not enforced on the fast path either, docs/split.md),
# access logs, HTTP/2 and HTTP/3 options, fields that only matter with
# use_remote_address (ENVOY) or with TLS, and Envoy's handling of requests the
# kernel hands over (Expect, Upgrade, invalid messages). Any other field: ENVOY.
_HCM_KNOWN = {
    "@type", "codecType", "statPrefix", "rds", "routeConfig", "httpFilters", "tracing",
    "commonHttpProtocolOptions", "http1SafeMaxConnectionDuration", "httpProtocolOptions",
    "http2ProtocolOptions", "http3ProtocolOptions", "serverName", "serverHeaderTransformation",
    "schemeHeaderTransformation", "maxRequestHeadersKb", "streamIdleTimeout", "requestTimeout",
    "requestHeadersTimeout", "drainTimeout", "delayedCloseTimeout", "accessLog", "accessLogFlushInterval",
    "flushAccessLogOnNewRequest", "accessLogOptions", "useRemoteAddress", "xffNumTrustedHops",
    "internalAddressConfig", "skipXffAppend", "generateRequestId", "preserveExternalRequestId",
    "alwaysSetRequestIdInResponse", "forwardClientCertDetails", "setCurrentClientCertDetails",
    "proxy100Continue", "representIpv4RemoteAddressAsIpv4MappedIpv6", "upgradeConfigs", "normalizePath",
    "mergeSlashes", "pathWithEscapedSlashesAction", "requestIdExtension", "streamErrorOnInvalidHttpMessage",
    "stripTrailingHostDot", "proxyStatusConfig", "typedHeaderValidationConfig", "appendXForwardedPort",
    "appendLocalOverload", "addProxyProtocolConnectionState", *_HCM_ENVOY_KEYS,
}
_COMMON_KNOWN = {"idleTimeout", "maxConnectionDuration", "maxHeadersCount", "maxStreamDuration",
                 "headersWithUnderscoresAction", "maxRequestsPerConnection", "maxResponseHeadersKb"}
# HTTP/1 options: header name case (not semantic: Envoy lower-cases names by
# default, the kernel forwards them as sent), and what only applies to requests
# the kernel hands over (absolute URLs, HTTP/1.0, trailers and chunked bodies,
# methods beyond its 28, invalid messages).
_HTTP1_KNOWN = {"headerKeyFormat", "allowAbsoluteUrl", "acceptHttp10", "defaultHostForHttp10",
                "enableTrailers", "allowChunkedLength", "allowCustomMethods",
                "overrideStreamErrorOnInvalidHttpMessage", "sendFullyQualifiedUrl"}


def _hcm_reasons(hcm: dict[str, Any]) -> list[str]:
    reasons = [f"http_connection_manager {k}" for k in _HCM_ENVOY_KEYS if hcm.get(k)]
    common = hcm.get("commonHttpProtocolOptions", {})
    unknown = [f"http_connection_manager field {k}" for k in sorted(set(hcm) - _HCM_KNOWN) if hcm[k]]
    unknown += [f"http_connection_manager common_http_protocol_options field {k}"
                for k in sorted(set(common) - _COMMON_KNOWN) if common[k]]
    http1 = hcm.get("httpProtocolOptions") or {}
    unknown += [f"http_connection_manager http_protocol_options field {k}"
                for k in sorted(set(http1) - _HTTP1_KNOWN) if http1[k]]
    reasons += unknown
    underscores = common.get("headersWithUnderscoresAction")
    if underscores == "DROP_HEADER":
        reasons.append("http_connection_manager drops headers with underscores")
    # Limits below the kernel's own: Envoy refuses requests the kernel would
    # forward (measured, Envoy 1.40: 400 for `x_a: 1`, 431 for a 6th header or
    # a 1.5 KB header under these settings, no answer to HTTP/1.1 on HTTP2).
    if underscores == "REJECT_REQUEST":
        reasons.append("http_connection_manager rejects headers with underscores (400)")
    if int(common.get("maxHeadersCount", KERNEL_HEAD_LINES)) < KERNEL_HEAD_LINES:
        reasons.append(f"http_connection_manager max_headers_count {common['maxHeadersCount']} (431 above it)")
    if int(hcm.get("maxRequestHeadersKb", 60)) * 1024 < KERNEL_HEAD_BYTES:
        reasons.append(f"http_connection_manager max_request_headers_kb {hcm['maxRequestHeadersKb']} (431 above it)")
    if duration_ms(common.get("maxStreamDuration", "0s")):
        reasons.append("http_connection_manager max_stream_duration")
    if hcm.get("codecType") in ("HTTP2", "HTTP3"):
        reasons.append(f"http_connection_manager codec_type {hcm['codecType']} (no HTTP/1.1 there)")
    # Settings that change what a request gets (measured, tests/split/test_hcm_settings_envoy.py):
    # a Host "web." routed (and sent) as "web"; x-forwarded-port upstream; a
    # proxy-status header on Envoy's error replies (an empty config enables it);
    # x-forwarded-proto and redirect schemes from the overwrite.
    if bool_field(hcm, "stripTrailingHostDot", False):
        reasons.append("http_connection_manager strip_trailing_host_dot")
    if bool_field(hcm, "appendXForwardedPort", False):
        reasons.append("http_connection_manager append_x_forwarded_port")
    if "proxyStatusConfig" in hcm:
        reasons.append("http_connection_manager proxy_status_config (reply header)")
    if (hcm.get("schemeHeaderTransformation") or {}).get("schemeToOverwrite"):
        reasons.append("http_connection_manager scheme_header_transformation scheme_to_overwrite")
    if hcm.get("typedHeaderValidationConfig"):
        reasons.append("http_connection_manager typed_header_validation_config")
    return reasons + request_id.hcm_reasons(hcm)  # x-request-id, x-forwarded-proto as the kernel adds them


def _vhosts(rc: dict[str, Any], ctx: RouteContext, trace: str = "") -> tuple[VirtualHost, ...]:
    """The virtual hosts' routes; `trace`: the HCM has tracing, on an
    "egress" (OUTBOUND), "inbound" (INBOUND) or "ingress" listener
    (_traced_route), "" without."""
    out = []
    rc_extra = [f"route config {k}" for k in sorted(set(rc) - _RC_KEYS) if rc[k]]
    for vh in rc.get("virtualHosts", []):
        vctx = replace(ctx, vhost=vh)
        extra = rc_extra + [f"virtual host {k}" for k in sorted(set(vh) - _VH_KEYS) if vh[k]]
        if vh.get("includeAttemptCountInResponse"):
            extra.append("virtual host include_attempt_count_in_response (response header)")
        routes = tuple(e for r in vh.get("routes", []) for e in _traced_route(r, vctx, trace))
        if extra:
            routes = tuple(_punt(r, "; ".join(extra)) for r in routes)
        out.append(VirtualHost(str(vh.get("name", "")), tuple(d.lower() for d in vh.get("domains", [])),
                               routes))
    return tuple(out)


def classify_cluster(c: dict[str, Any], endpoints: dict[str, dict[str, Any]],
                     caps: KernelCaps | None = None) -> Cluster:
    """Envoy Cluster -> plan.Cluster; ``endpoints`` are ClusterLoadAssignments by name."""
    name = str(c.get("name", ""))
    caps = caps or KernelCaps()
    reasons = []
    lb = _typed_lb(c) or _LB.get(c.get("lbPolicy", "ROUND_ROBIN"))
    if lb is None:
        reasons.append(f"lb_policy {c.get('lbPolicy')}")
    kind = c.get("type", "STATIC")
    if "clusterType" in c or kind == "ORIGINAL_DST":
        reasons.append("original destination / custom cluster type")
    cla = c.get("loadAssignment")
    if kind == "EDS":
        svc = c.get("edsClusterConfig", {}).get("serviceName") or name
        cla = endpoints.get(svc)
        if cla is None:
            why = dict(caps.eds_missing).get(svc)
            reasons.append(f"EDS endpoints not available ({why})" if why else "EDS endpoints not available")
    eps, more = _endpoints(cla or {}, kind, caps.dns_endpoints)
    reasons += more
    if lb in (LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_REQUEST) and len({e.weight for e in eps}) > 1:
        # Envoy 1.40 weights these picks (1:9 gives 10 %/90 %); the kernel picks
        # evenly. RANDOM ignores weights in Envoy too (tests/split/test_lb_weights_envoy.py).
        reasons.append(f"endpoint weights under {lb.name} (Envoy weights its picks; the kernel "
                       "picks endpoints evenly)")
    if lb is LbPolicy.LEAST_REQUEST and len(eps) > 1:
        # Envoy 1.40: power of two choices over its active requests per host,
        # which steers away from a slow host (tests/split/test_least_request_envoy.py);
        # the kernel does the same over its own requests in flight (l7fp_decide.h
        # l7fp_pick_lr), for the configurations checked here.
        reasons += _least_request_reasons(c, len(eps))
    if "transportSocket" in c or "transportSocketMatches" in c:
        reasons.append("upstream TLS (no kTLS on this kernel)")
    reasons += _cluster_options(c)
    od_reasons = _outlier_reasons(c, eps, lb)
    reasons += od_reasons
    reasons += [f"{t} unknown to L7FP (kept opaque for Envoy)" for t in opaque_types(c)]
    return Cluster(name, lb or LbPolicy.ROUND_ROBIN, tuple(eps), None, "transportSocket" in c,
                   Verdict.ENVOY if reasons else Verdict.KERNEL, "; ".join(reasons),
                   max_retries=max_retries(c.get("circuitBreakers", {})),
                   original_dst=kind == "ORIGINAL_DST"
                   and not c.get("originalDstLbConfig", {}).get("useHttpHeader"),
                   outlier=None if od_reasons else outlier.config_of(c),
                   eds_name=(c.get("edsClusterConfig", {}).get("serviceName") or name)
                   if kind == "EDS" else None)


def _least_request_reasons(c: dict[str, Any], n: int) -> list[str]:
    """Why the kernel's pick (two draws, the endpoint with fewer requests in
    flight, equal weights: unequal ones are refused above) is not this
    LEAST_REQUEST cluster's of `n` (2+) endpoints."""
    out = []
    cfg = {**(c.get("leastRequestLbConfig") or {}), **(_typed_config(c) or {})}
    choices = cfg.get("choiceCount", 2)
    choices = int(choices.get("value", 2) if isinstance(choices, dict) else choices)
    if choices != 2:
        out.append(f"LEAST_REQUEST choice_count {choices} (the kernel draws two)")
    if cfg.get("enableFullScan") or cfg.get("selectionMethod") == "FULL_SCAN":
        out.append("LEAST_REQUEST full scan (the kernel draws two)")
    if n > LR_MAX_ENDPOINTS:
        out.append(f"LEAST_REQUEST over more than {LR_MAX_ENDPOINTS} endpoints (the kernel's "
                   "in-flight counters per cluster)")
    if c.get("outlierDetection") is not None:
        out.append("LEAST_REQUEST with outlier detection (the kernel re-picks past an ejected "
                   "host at random)")
    return out


def _outlier_reasons(c: dict[str, Any], eps: list[Endpoint], lb: LbPolicy | None) -> list[str]:
    """Why the kernel cannot run this cluster's outlier detection (fastpath.outlier)."""
    if c.get("outlierDetection") is None:
        return []
    out = outlier.unsupported(c, len(eps))
    if lb not in (LbPolicy.ROUND_ROBIN, LbPolicy.RANDOM, LbPolicy.LEAST_REQUEST):
        out.append("outlier detection with a hash load balancer")
    if any(not e.healthy for e in eps):
        out.append("outlier detection with EDS-unhealthy endpoints (panic counts them)")
    return out


# Cluster fields with no effect on which endpoint serves a request or on what
# it gets back (timeouts of connects, DNS knobs, stats, keepalive, buffers); the
# ones with an effect are checked one by one below; any other needs Envoy.
_CLUSTER_KEYS = {
    "name", "type", "connectTimeout", "lbPolicy", "loadAssignment", "edsClusterConfig",
    "dnsLookupFamily", "dnsRefreshRate", "respectDnsTtl", "dnsResolvers", "typedDnsResolverConfig",
    "useTcpForDnsLookups", "dnsFailureRefreshRate", "perConnectionBufferLimitBytes", "commonLbConfig",
    "typedExtensionProtocolOptions", "altStatName", "metadata", "transportSocket",
    "transportSocketMatches", "circuitBreakers", "outlierDetection", "healthChecks",
    "upstreamConnectionOptions", "cleanupInterval", "ringHashLbConfig", "maglevLbConfig",
    "leastRequestLbConfig", "roundRobinLbConfig", "trackClusterStats", "http2ProtocolOptions",
    "httpProtocolOptions", "commonHttpProtocolOptions", "closeConnectionsOnHostHealthFailure",
    "ignoreHealthOnHostRemoval", "lrsServer", "trackTimeoutBudgets", "clusterType",
    "loadBalancingPolicy", "protocolSelection", "connectionPoolPerDownstreamConnection",
}
_TYPED_LB = {"round_robin": LbPolicy.ROUND_ROBIN, "random": LbPolicy.RANDOM,
             "least_request": LbPolicy.LEAST_REQUEST}


def _typed_config(c: dict[str, Any]) -> dict[str, Any] | None:
    """The typed config of the cluster's load_balancing_policy (its first policy), if any."""
    for p in c.get("loadBalancingPolicy", {}).get("policies", [])[:1]:
        return dict(p.get("typedExtensionConfig", {}).get("typedConfig", {}))
    return None


def _typed_lb(c: dict[str, Any]) -> LbPolicy | None:
    """The policy a typed load_balancing_policy names: Envoy uses it instead of
    lb_policy (a least_request one is LEAST_REQUEST whatever lb_policy says)."""
    t = str((_typed_config(c) or {}).get("@type", ""))
    return next((lb for k, lb in _TYPED_LB.items() if f".{k}." in t), None)


def _cluster_options(c: dict[str, Any]) -> list[str]:
    reasons = [f"cluster field {k}" for k in sorted(set(c) - _CLUSTER_KEYS) if c[k]]
    typed = _typed_config(c)
    if typed is not None and _typed_lb(c) is None:
        t = str(typed.get("@type", ""))
        reasons.append(f"load_balancing_policy {t.rsplit('/', 1)[-1] or '?'}")
    panic = c.get("commonLbConfig", {}).get("healthyPanicThreshold")
    if panic is not None and float(panic.get("value", 0.0)) != 50.0 \
            and c.get("outlierDetection") is None:  # proto3: absent = 0; outlier: its own
        reasons.append("healthy_panic_threshold other than 50%")
    if c.get("http2ProtocolOptions") or "grpc" in str(c.get("http2ProtocolOptions", "")):
        reasons.append("upstream HTTP/2")
    commons = [c.get("commonHttpProtocolOptions", {})] + [
        opt.get("commonHttpProtocolOptions", {}) for opt in c.get("typedExtensionProtocolOptions", {}).values()]
    if any(duration_ms(o.get("maxStreamDuration", "0s")) for o in commons):
        # measured, Envoy 1.40: 504 "upstream max stream duration reached"
        reasons.append("upstream max_stream_duration (Envoy answers 504 past it)")
    for opt in c.get("typedExtensionProtocolOptions", {}).values():
        cfg = opt.get("explicitHttpConfig", {})
        if "http2ProtocolOptions" in cfg or "http3ProtocolOptions" in cfg:
            reasons.append("upstream HTTP/2")
        if "useDownstreamProtocolConfig" in opt or "autoConfig" in opt:
            reasons.append("upstream protocol chosen per request")
    if _limiting_breakers(c.get("circuitBreakers", {})):
        reasons.append("circuit breakers below Envoy's defaults (stateful, owned by Envoy)")
    if c.get("healthChecks"):
        reasons.append("active health checks")
    if c.get("commonLbConfig", {}).get("localityWeightedLbConfig") is not None \
            and "localityWeightedLbConfig" in c.get("commonLbConfig", {}):
        reasons.append("locality weighted LB")
    if _slow_start(c):
        reasons.append("slow start (a new endpoint's weight ramps up; the kernel picks evenly)")
    return reasons


def _slow_start(c: dict[str, Any]) -> bool:
    """Whether the cluster's round robin / least request LB has a slow start
    window (Istio's DestinationRule `warmupDurationSecs` in istiod's output):
    Envoy then weights endpoints by their age, which the kernel does not."""
    cfgs = [c.get("roundRobinLbConfig") or {}, c.get("leastRequestLbConfig") or {},
            _typed_config(c) or {}]
    return any((cfg.get("slowStartConfig") or {}).get("slowStartWindow") not in (None, "0s")
               for cfg in cfgs)


# Envoy applies these thresholds to every cluster, configured or not; the fast path
# enforces none of them (docs/split.md). Thresholds at or above them (Istio sets
# 2^32-1) add nothing, lower ones are real limits whose only owner is Envoy.
_BREAKER_DEFAULTS = {"maxConnections": 1024, "maxPendingRequests": 1024, "maxRequests": 1024,
                     "maxRetries": 3}


def max_retries(cb: dict[str, Any]) -> int:
    """The DEFAULT-priority max_retries threshold (Envoy's default 3): how many
    retries of the cluster may be pending at once (the data path's retries too)."""
    for t in cb.get("thresholds", []):
        if t.get("priority", "DEFAULT") == "DEFAULT" and "maxRetries" in t:
            return int(t["maxRetries"])
    return _BREAKER_DEFAULTS["maxRetries"]


def _limiting_breakers(cb: dict[str, Any]) -> bool:
    for t in cb.get("thresholds", []):
        if t.get("retryBudget") or t.get("maxConnectionPools") is not None:
            return True
        if any(int(t.get(k, d)) < d for k, d in _BREAKER_DEFAULTS.items()):
            return True
    return False


def _endpoints(cla: dict[str, Any], kind: str, dns: bool) -> tuple[list[Endpoint], list[str]]:
    eps, reasons = [], []
    for group in cla.get("endpoints", []):
        if int(group.get("priority", 0)) > 0:
            reasons.append("endpoint priorities (failover)")
        for lbe in group.get("lbEndpoints", []):
            sa = lbe.get("endpoint", {}).get("address", {}).get("socketAddress", {})
            host = str(sa.get("address", ""))
            if not _is_ip(host) and not dns:
                reasons.append(f"endpoint {host!r} is a DNS name ({kind})")
            healthy = lbe.get("healthStatus", "UNKNOWN") in ("UNKNOWN", "HEALTHY", "DEGRADED")
            eps.append(Endpoint(host, int(sa.get("portValue", 0)),
                                int(lbe.get("loadBalancingWeight", 1)), healthy))
    return eps, list(dict.fromkeys(reasons))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
