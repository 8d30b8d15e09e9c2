"""One Envoy route (proto-JSON) -> plan.Route with its verdict and reasons.

Called by `fastpath.classify` for every route of every virtual host; owned by
the split. The kernel's capabilities are those of DESIGN.md §5 (HTTP/1.1 parse
in sk_msg, redirect to a pooled, pre-connected upstream, replies written by the
kernel, no TLS, no response processing, no timers). Anything else is a reason
for Envoy, named after the Envoy feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fastpath.classify_delay import route_delay
from fastpath.classify_guards import (
    Guard,
    cors_guards,
    csrf_guards,
    guard_routes,
    mirror_header_guards,
)
from fastpath.classify_lrl import config_reasons, reply_headers
from fastpath.classify_match import Reasons, route_match
from fastpath.envoy_model import duration_ms, type_name
from fastpath.mirror import header_guard_names, mirror_policies
from fastpath.plan import (
    Action,
    Cluster,
    ClusterAction,
    DirectResponse,
    FaultAbort,
    HeaderValue,
    LbPolicy,
    LocalRateLimit,
    MirrorPolicy,
    Redirect,
    RetryPolicy,
    Route,
    Verdict,
    WeightedCluster,
)
from fastpath.rewrite import path_rewrite
from xds_server.protojson import is_opaque

ENVOY_DEFAULT_TIMEOUT_MS = 15_000
# retry_on conditions that cannot fire on the kernel path: the pooled upstream is
# already connected (connect-failure), speaks HTTP/1.1 (refused-stream is an
# HTTP/2 RST_STREAM code, http3-post-connect-failure is HTTP/3 only).
NEVER_FIRING_RETRY_ON = frozenset({"connect-failure", "refused-stream", "http3-post-connect-failure"})


@dataclass(frozen=True)
class KernelCaps:
    """What the kernel data path can do. Defaults: DESIGN.md §5 as built today.

    ``route_timeouts``: the data path enforces a route's response timeout
    (including Envoy's 15 s default) as Envoy does: 504 "upstream request
    timeout" before the response started, the connection cut after
    (bpf_src/dp_timeout.h, fastpath/timeouts.py; docs/fastpath.md "Route
    timeouts"). False gives the figures of the kernel without it.
    """

    route_timeouts: bool = True
    # STRICT_DNS/LOGICAL_DNS endpoints given by name: the user-space agent that
    # owns the upstream pools resolves them (getaddrinfo, re-resolved like Envoy's
    # dns_refresh_rate); the kernel only ever sees the pooled sockets.
    dns_endpoints: bool = True
    # The data path retries on the response status / grpc-status (retriable-status-codes,
    # retriable-4xx and the gRPC conditions; bpf_src/sk_msg.c + fastpath/retry*.py).
    status_retries: bool = True
    # The data path holds a sampled share of a route's requests for the fault
    # filter's fixed delay (bpf_src/dp_delay.h, fastpath/agent_delay.py).
    fault_delays: bool = True
    # Runtime layers of the bootstrap that can override fault percentages at any
    # time ("" when none; fastpath.classify_delay.runtime_of): faults stay ENVOY.
    fault_runtime: str = ""
    # The data path copies a mirrored request to the agent, which sends the
    # shadow (bpf_src/dp_mirror.h, fastpath/agent_mirror.py).
    mirrors: bool = True
    # Input facts, not capabilities: EDS service name -> why the input gives it no
    # endpoints (a CiliumEnvoyConfig's Service missing: fastpath.inputs_cilium).
    eds_missing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HttpFilter:
    """One entry of HttpConnectionManager.http_filters."""

    name: str
    kind: str  # short type: "router", "rbac", "local_ratelimit", "fault", "lua", ...
    config: dict[str, Any]
    disabled: bool = False


@dataclass
class RouteContext:
    """What a route's verdict depends on beyond the route itself."""

    clusters: dict[str, Cluster]
    filters: list[HttpFilter]
    caps: KernelCaps = field(default_factory=KernelCaps)
    vhost: dict[str, Any] = field(default_factory=dict)
    route_config: dict[str, Any] = field(default_factory=dict)


def filter_kind(f: dict[str, Any]) -> str:
    """Short kind of an http filter: from its typed_config type, else its name."""
    tc = f.get("typedConfig") or {}
    t = tc.get("@type")
    if t and type_name(t) in ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"):
        t = tc.get("typeUrl", t)
    name = str(f.get("name", "")).rsplit(".", 1)[-1]
    if t:
        parts = type_name(t).split(".")
        if len(parts) >= 3 and parts[-2].startswith("v"):
            return parts[-3]
        # an unversioned message name says nothing (istiod's io.istio.http.peer_metadata.Config,
        # stats.PluginConfig): the filter's name does (metadata_exchange, stats)
        return name if parts[-1][:1].isupper() and name else parts[-1]
    return name


def classify_route(r: dict[str, Any], ctx: RouteContext) -> Route:
    """Build the plan entry of route ``r`` (proto-JSON) in context ``ctx``."""
    return _classify(r, ctx)[-1]


def classify_route_entries(r: dict[str, Any], ctx: RouteContext) -> list[Route]:
    """The plan entries of route ``r``: its guard punt entries (fastpath.classify_guards),
    then the route itself."""
    return _classify(r, ctx)


def _classify(r: dict[str, Any], ctx: RouteContext) -> list[Route]:
    match, reasons = route_match(r.get("match", {}))
    action, more = _action(r, ctx)
    reasons += more
    action, more = _regex_rewrite(r.get("route", {}), match, action, ctx)
    reasons += more
    adds, removes, more = _headers(r, ctx)
    adds = _router_headers(action, ctx) + adds
    reasons += more
    per_filter = {**ctx.route_config.get("typedPerFilterConfig", {}),
                  **ctx.vhost.get("typedPerFilterConfig", {}), **r.get("typedPerFilterConfig", {})}
    fault, limit, more, guards = _filters(per_filter, ctx)
    reasons += more
    delay, more = _delay(per_filter, action, ctx)
    reasons += more
    more, mirror_guards = _mirror_header(action, adds, removes, ctx)
    reasons += more
    guards += mirror_guards
    cors = r.get("cors", ctx.vhost.get("cors"))
    if cors is not None and any(f.kind == "cors" and not f.disabled for f in ctx.filters):
        guards += cors_guards(cors)  # without the CORS filter the field does nothing
    for key in ("rateLimits",):
        if r.get(key) or ctx.vhost.get(key):
            reasons.append("global rate limit descriptors (ratelimit service)")
    if ctx.vhost.get("requireTls", "NONE") != "NONE":
        reasons.append("virtual host require_tls")
    unknown = set(r) - _KNOWN_ROUTE_KEYS
    reasons += [f"route field {k}" for k in sorted(unknown)]
    route = Route(
        name=str(r.get("name", "")), match=match, action=action,
        verdict=Verdict.ENVOY if reasons else Verdict.KERNEL,
        reason="; ".join(dict.fromkeys(reasons)), request_headers_to_add=tuple(adds),
        request_headers_to_remove=tuple(removes), fault_abort=fault, rate_limit=limit,
        fault_delay=delay,
    )
    entries, more = guard_routes(route, guards)
    if more:
        return [replace(route, verdict=Verdict.ENVOY, reason="; ".join(more))]
    return [*entries, route]


_KNOWN_ROUTE_KEYS = {
    "name", "match", "route", "redirect", "directResponse", "requestHeadersToAdd",
    "requestHeadersToRemove", "responseHeadersToAdd", "responseHeadersToRemove",
    "typedPerFilterConfig", "decorator", "metadata", "statPrefix", "tracing", "cors",
    "rateLimits", "filterAction", "nonForwardingAction",
}


def _action(r: dict[str, Any], ctx: RouteContext) -> tuple[Action, Reasons]:
    if "directResponse" in r:
        return _direct(r["directResponse"])
    if "redirect" in r:
        return _redirect(r["redirect"])
    if "route" in r:
        return _forward(r["route"], ctx)
    other = sorted(set(r) & {"filterAction", "nonForwardingAction"}) or ["(no action)"]
    return ClusterAction(()), [f"route action {other[0]}"]


def _direct(d: dict[str, Any]) -> tuple[Action, Reasons]:
    body = d.get("body", {})
    reasons = [] if set(body) <= {"inlineString"} else [f"direct_response body {sorted(body)}"]
    return DirectResponse(int(d.get("status", 0)), body.get("inlineString", "")), reasons


def _redirect(d: dict[str, Any]) -> tuple[Action, Reasons]:
    codes = {"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303,
             "TEMPORARY_REDIRECT": 307, "PERMANENT_REDIRECT": 308}
    reasons = [f"redirect {k}" for k in sorted(set(d) & {"regexRewrite"})]
    scheme = "https" if d.get("httpsRedirect") else d.get("schemeRedirect")
    port = d.get("portRedirect")
    return Redirect(
        status=codes.get(d.get("responseCode", "MOVED_PERMANENTLY"), 301), scheme=scheme,
        host=d.get("hostRedirect"), port=int(port) if port else None,
        path=d.get("pathRedirect"), prefix_rewrite=d.get("prefixRewrite"),
        strip_query=bool(d.get("stripQuery", False)),
    ), reasons


_FORWARD_OK = {"cluster", "weightedClusters", "prefixRewrite", "hostRewriteLiteral", "timeout",
               "retryPolicy", "hashPolicy", "idleTimeout", "clusterNotFoundResponseCode",
               "maxGrpcTimeout", "grpcTimeoutOffset", "priority", "includeVhRateLimits",
               "rateLimits", "cors", "autoHostRewrite", "maxStreamDuration", "upgradeConfigs",
               "requestMirrorPolicies", "regexRewrite"}
# upgradeConfigs: Envoy uses them only for a request with both `Upgrade` and
# `Connection: upgrade` (or CONNECT); every other request of the route is a
# plain one (Envoy 1.40, tests/split/test_upgrade.py). The kernel hands every
# request with an Upgrade header and every CONNECT to Envoy (l7fp_http.h,
# L7FP_R_UPGRADE), so no guard entry is needed.


def _forward(a: dict[str, Any], ctx: RouteContext) -> tuple[Action, Reasons]:
    reasons: Reasons = [f"route {k}" for k in sorted(set(a) - _FORWARD_OK)]
    if a.get("autoHostRewrite"):
        reasons.append("route auto_host_rewrite")
    if "cluster" in a:
        clusters = [WeightedCluster(a["cluster"], 1)]
    elif "weightedClusters" in a:
        clusters, more = _weighted(a["weightedClusters"])
        reasons += more
    else:
        clusters = []
    # With max_stream_duration on the route (Istio's sidecar routes carry one),
    # Envoy's router ignores `timeout` (RouteEntry::usingNewTimeouts; seen on
    # Envoy 1.40: a 1 s timeout then never fired); max_stream_duration > 0 is
    # ENVOY below
    timeout = None if "maxStreamDuration" in a else duration_ms(a.get("timeout", "15s")) or None
    if timeout and not ctx.caps.route_timeouts:
        default = " (Envoy default)" if "timeout" not in a else ""
        reasons.append(f"route timeout {timeout}ms{default}: no response timer in the kernel")
    if duration_ms(a.get("idleTimeout", "0s")):
        reasons.append("route idle_timeout")
    msd = a.get("maxStreamDuration", {})
    # Istio sets both to 0s: no limit; a grpc-timeout header is then honoured, so
    # the kernel hands requests carrying one to Envoy (fastpath.reference).
    if duration_ms(msd.get("maxStreamDuration", "0s")) or "grpcTimeoutHeaderOffset" in msd:
        reasons.append("route max_stream_duration")
    retry, more = retry_policy(a.get("retryPolicy", ctx.vhost.get("retryPolicy")), ctx.caps)
    reasons += more
    # a route timeout with retries: the retry agent moves the request's timer to
    # each attempt's upstream, one deadline over all attempts (fastpath/deadline.py)
    hash_header, more = _hash(a.get("hashPolicy", []), clusters, ctx)
    reasons += more
    mirrors, more = _mirrors(a, ctx)
    reasons += more
    for c in clusters:
        plan_c = ctx.clusters.get(c.name)
        if plan_c is None:
            reasons.append(f"cluster {c.name!r} not defined")
        elif plan_c.verdict is Verdict.ENVOY:
            reasons.append(f"cluster {c.name!r}: {plan_c.reason}")
    action = ClusterAction(tuple(clusters), a.get("prefixRewrite"), a.get("hostRewriteLiteral"),
                           timeout, duration_ms(a.get("idleTimeout")) or None,
                           cluster_header=a.get("clusterHeader"), retry=retry, mirrors=mirrors)
    if hash_header:
        action = ClusterAction(**{**action.__dict__, "hash_header": hash_header})
    return action, reasons


def _regex_rewrite(a: dict[str, Any], match: Any, action: Action,
                   ctx: RouteContext) -> tuple[Action, Reasons]:
    """A forward's regex_rewrite: the kernel form (fastpath.rewrite) on the
    action, or why it needs Envoy."""
    rr = a.get("regexRewrite")
    if (rr is None and not a.get("prefixRewrite")) or not isinstance(action, ClusterAction):
        return action, []
    if _suppresses_envoy_headers(ctx):
        # x-envoy-original-path is then not sent: not measured, so Envoy's
        return action, ["path rewrite with the router's suppress_envoy_headers"]
    if rr is None:
        return action, []
    rw, reasons = path_rewrite(rr, match)
    if "prefixRewrite" in a:
        reasons.append("regex_rewrite with prefix_rewrite")
    return replace(action, path_rewrite=rw), reasons


def _mirrors(a: dict[str, Any], ctx: RouteContext) -> tuple[tuple[MirrorPolicy, ...], Reasons]:
    """The route's (else its virtual host's) mirror policies: the data path
    copies the request to the agent, which sends the shadow (fastpath.mirror)."""
    items = a.get("requestMirrorPolicies", ctx.vhost.get("requestMirrorPolicies"))
    if not items:
        return (), []
    if not ctx.caps.mirrors:
        return (), ["route requestMirrorPolicies"]
    return mirror_policies(items, ctx.clusters)


def _mirror_header(action: Action, adds: list[HeaderValue], removes: list[str],
                   ctx: RouteContext) -> tuple[Reasons, list[Guard]]:
    """cluster_header mirror policies: guard entries for the names the kernel
    path cannot shadow to (fastpath.mirror.header_guard_names); a route that
    adds or removes that header itself stays ENVOY (the guards see the
    client's value, Envoy's router the value after the route's changes)."""
    if not isinstance(action, ClusterAction):
        return [], []
    headers = {m.cluster_header for m in action.mirrors if m.cluster_header}
    if not headers:
        return [], []
    touched = sorted(headers & ({h.name.lower() for h in adds} | {h.lower() for h in removes}))
    if touched:
        return [f"mirror cluster_header {touched[0]} changed by the route's header adds/removes"], []
    pairs, reasons = header_guard_names(action.mirrors, ctx.clusters)
    return reasons, mirror_header_guards(pairs)


def _weighted(w: dict[str, Any]) -> tuple[list[WeightedCluster], Reasons]:
    out, reasons = [], []
    for c in w.get("clusters", []):
        extra = set(c) - {"name", "weight"}
        reasons += [f"weighted cluster {c.get('name')!r} {k}" for k in sorted(extra)]
        if "clusterHeader" in c:
            reasons.append("weighted cluster_header")
        out.append(WeightedCluster(str(c.get("name", "")), int(c.get("weight", 0))))
    if "runtimeKeyPrefix" in w or "headerName" in w:
        reasons.append("weighted clusters chosen by runtime/header")
    return out, reasons


# Conditions decided on the upstream's response status or grpc-status.
STATUS_RETRY_ON = frozenset({"5xx", "gateway-error", "retriable-4xx", "retriable-status-codes",
                             "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                             "unavailable"})
# The subset the data path retries exactly as Envoy does (status/grpc-status of the
# response head). 5xx and gateway-error also retry on an upstream reset: in the mesh
# the destination's sidecar answers an app's close with a 503 response, which the
# data path makes of a close too (fastpath/agent_reset.py), and `reset` then never
# fires (the client's sidecar sees that 503, not a reset). Their per-try timeouts
# stay ENVOY (retry_policy below); unpaired upstreams (no sidecar) take Envoy.
GRPC_RETRY_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8,
                    "internal": 13, "unavailable": 14}
RESET_RETRY_ON = frozenset({"5xx", "gateway-error", "reset"})
KERNEL_RETRY_ON = frozenset({"retriable-status-codes", "retriable-4xx", *GRPC_RETRY_CODES,
                             *RESET_RETRY_ON})
STATUS_CLASS_5XX = 5  # a retry code below 10 is a status class (bpf_src/dp_retry.h)
GATEWAY_ERRORS = (502, 503, 504)
_RETRY_KEYS = {"retryOn", "numRetries", "perTryTimeout", "retryHostPredicate",
               "hostSelectionRetryMaxAttempts", "retriableStatusCodes", "retryBackOff",
               "retriableHeaders", "retriableRequestHeaders", "perTryIdleTimeout"}
PREVIOUS_HOSTS = "previous_hosts"
RETRY_CODES = 8  # status codes a kernel retry policy holds (DP_RETRY_CODES, bpf_src/dp_retry.h)


def _retry(p: dict[str, Any] | None, caps: KernelCaps) -> Reasons:
    """A retry policy is kernel-safe if none of its conditions can fire, or (with
    ``caps.status_retries``) if the data path retries all that can fire."""
    return retry_policy(p, caps)[1]


def retry_policy(p: dict[str, Any] | None, caps: KernelCaps) -> tuple[RetryPolicy | None, Reasons]:
    """Envoy RetryPolicy (proto-JSON) -> (plan.RetryPolicy or None, reasons for Envoy).

    None when no condition can fire on the kernel path (nothing to execute)."""
    if not p:
        return None, []
    reasons = []
    per_try = duration_ms(p.get("perTryTimeout", "0s"))
    if per_try and not (caps.route_timeouts and caps.status_retries):
        reasons.append("retry per_try_timeout")
    if duration_ms(p.get("perTryIdleTimeout", "0s")):
        reasons.append("retry per_try_idle_timeout")
    num = int(p.get("numRetries", 1))
    conds = {c.strip() for c in str(p.get("retryOn", "")).split(",") if c.strip()}
    can_fire = conds - NEVER_FIRING_RETRY_ON
    # Envoy retries a per-try timeout (a local reset) only under 5xx,
    # gateway-error, reset: the timer thread then hands the attempt to the retry
    # agent instead of answering 504 (fastpath/agent_reset.py per_try_expired)
    if per_try and (num == 0 or not can_fire) and "retry per_try_timeout" not in reasons:
        # the kernel's per-try timer rides on its retry record (none here)
        reasons.append("retry per_try_timeout without a retry the kernel makes")
    if num == 0:
        return None, reasons
    kernel_ok = KERNEL_RETRY_ON if caps.status_retries else frozenset()
    firing = sorted(can_fire - kernel_ok)
    if firing:
        reasons.append(f"retry_policy retry_on={','.join(firing)} can fire")
    if p.get("retriableHeaders") or p.get("retriableRequestHeaders"):
        reasons.append("retry on headers")
    reasons += [f"retry_policy {k}" for k in sorted(set(p) - _RETRY_KEYS)]
    hosts, more = _host_predicates(p)
    reasons += more
    if not can_fire:
        return None, reasons
    codes = [int(c) for c in p.get("retriableStatusCodes", [])] \
        if "retriable-status-codes" in conds else []
    if "retriable-4xx" in conds:
        codes.append(409)
    codes = _reset_codes(conds, codes)
    if len(set(codes)) > RETRY_CODES:
        reasons.append(f"more than {RETRY_CODES} retriable status codes")
    backoff = p.get("retryBackOff", {})
    base = duration_ms(backoff.get("baseInterval", "0.025s")) or 25
    policy = RetryPolicy(
        num_retries=num, retry_on=tuple(sorted(conds)), status_codes=tuple(sorted(set(codes))),
        grpc_codes=tuple(sorted(GRPC_RETRY_CODES[c] for c in conds & GRPC_RETRY_CODES.keys())),
        previous_hosts=hosts, host_selection_attempts=int(p.get("hostSelectionRetryMaxAttempts", 1)),
        base_ms=base, max_ms=duration_ms(backoff.get("maxInterval", "0s")) or 10 * base,
        per_try_timeout_ms=per_try or None)
    return policy, reasons


def _reset_codes(conds: set[str], codes: list[int]) -> list[int]:
    """`codes` plus the statuses 5xx (a class) and gateway-error (502-504) retry."""
    if "gateway-error" in conds:
        codes = [*codes, *GATEWAY_ERRORS]
    if "5xx" in conds:
        codes = [c for c in codes if c // 100 != 5] + [STATUS_CLASS_5XX]
    return codes


def _host_predicates(p: dict[str, Any]) -> tuple[bool, Reasons]:
    """previous_hosts is executed by the agent; any other host predicate needs Envoy."""
    hosts, reasons = False, []
    for pred in p.get("retryHostPredicate", []):
        kind = str(pred.get("typedConfig", {}).get("@type", "")) + str(pred.get("name", ""))
        if PREVIOUS_HOSTS in kind:
            hosts = True
        else:
            reasons.append(f"retry host predicate {pred.get('name', kind)}")
    return hosts, reasons


def _hash(policies: list[dict[str, Any]], clusters: list[WeightedCluster],
          ctx: RouteContext) -> tuple[str | None, Reasons]:
    hashing = any(ctx.clusters.get(c.name) and ctx.clusters[c.name].lb_policy in
                  (LbPolicy.RING_HASH, LbPolicy.MAGLEV) for c in clusters)
    if not policies or not hashing:
        return None, []  # Envoy ignores a hash policy unless the cluster hashes
    first = policies[0]
    header = first.get("header", {}).get("headerName")
    # The endpoint must be the one Envoy's ring would pick, or a key's requests
    # split across two endpoints whenever the kernel hands one to Envoy.
    why = f"consistent hash on {'header ' + repr(header) if header else sorted(first)[0]}: " \
          "kernel ring must equal Envoy's"
    return (header.lower() if header else None), [why]


def _headers(r: dict[str, Any], ctx: RouteContext) -> tuple[list[HeaderValue], list[str], Reasons]:
    adds: list[HeaderValue] = []
    removes: list[str] = []
    reasons: Reasons = []
    for level, name in ((r, "route"), (ctx.vhost, "virtual host"), (ctx.route_config, "route config")):
        for h in level.get("requestHeadersToAdd", []):
            hv, more = _header_value(h, name)
            reasons += more + _unmodifiable(hv.name, "added", "modified")
            # Envoy 1.40 skips an empty value without keep_empty_value (it neither adds
            # nor overwrites the header; tests/split/test_header_adds_envoy.py)
            if hv.value or h.get("keepEmptyValue"):
                adds.append(hv)
        for x in level.get("requestHeadersToRemove", []):
            removes.append(str(x).lower())
            reasons += _unmodifiable(removes[-1], "removed", "removed")
        if level.get("responseHeadersToAdd") or level.get("responseHeadersToRemove"):
            reasons.append(f"{name} changes response headers")
    return adds, removes, reasons


def _unmodifiable(name: str, what: str, done: str) -> Reasons:
    """Envoy 1.40 rejects a config that adds or removes `host` or a pseudo-header
    (measured with `envoy --mode validate`, tests/split/test_header_adds_envoy.py)."""
    if name != "host" and not name.startswith(":"):
        return []
    return [f"invalid config: {what} header {name!r}: Envoy rejects it "
            f"(\":-prefixed or host headers may not be {done}\")"]


def _router_headers(action: Action, ctx: RouteContext) -> list[HeaderValue]:
    """The lines Envoy's router sets before it applies the route's
    request_headers_to_add (Router::Filter::decodeHeaders: finalTimeout, then
    the attempt count, then finalizeRequestHeaders), in that order: the
    upstream sees x-envoy-expected-rq-timeout-ms, x-envoy-attempt-count, then
    the route's adds (seen with Envoy 1.40, tests/split/test_tracing_envoy.py)."""
    adds = _timeout_header(action, ctx)
    if ctx.vhost.get("includeRequestAttemptCount"):
        # Envoy sends the attempt number upstream: 1 here; a retry by the data
        # path rewrites it in its copy of the request (fastpath/retry.py).
        adds.append(HeaderValue("x-envoy-attempt-count", "1", append=False))
    return adds


def _suppresses_envoy_headers(ctx: RouteContext) -> bool:
    """The HCM's router has suppress_envoy_headers: no x-envoy-* request headers."""
    router = next((f for f in ctx.filters if f.kind == "router"), None)
    return router is not None and bool(router.config.get("suppressEnvoyHeaders"))


def _timeout_header(action: Action, ctx: RouteContext) -> list[HeaderValue]:
    """Envoy's router tells the upstream the route timeout in
    x-envoy-expected-rq-timeout-ms (unless the router suppresses Envoy's
    headers); the kernel sends the same header (seen with a real Envoy 1.40).
    Added, not overwritten: a request that carries any x-envoy-*-timeout-ms
    header goes to Envoy (l7fp_http.h, fastpath.reference)."""
    ms = expected_timeout_ms(action)
    if not ms or _suppresses_envoy_headers(ctx):
        return []
    return [HeaderValue("x-envoy-expected-rq-timeout-ms", str(ms), append=True)]


def expected_timeout_ms(action: Action) -> int | None:
    """The first attempt's x-envoy-expected-rq-timeout-ms (Envoy's
    FilterUtility::setTimeoutHeaders): the retry policy's per-try timeout,
    else the route timeout, at most the route timeout. A retry's value is set
    by the retry agent (fastpath.deadline.expected_timeout_ms)."""
    ms = getattr(action, "timeout_ms", None)
    retry = getattr(action, "retry", None)
    per_try = getattr(retry, "per_try_timeout_ms", None)
    if per_try:
        return min(per_try, ms) if ms else per_try
    return ms


def _header_value(h: dict[str, Any], level: str) -> tuple[HeaderValue, Reasons]:
    kv = h.get("header", {})
    key, value = str(kv.get("key", "")).lower(), str(kv.get("value", kv.get("rawValue", "")))
    action = h.get("appendAction", "APPEND_IF_EXISTS_OR_ADD")
    append = bool(h.get("append", action == "APPEND_IF_EXISTS_OR_ADD"))
    reasons = []
    if action not in ("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD"):
        reasons.append(f"{level} header {key!r} append_action {action}")
    if "%" in value:
        reasons.append(f"{level} header {key!r} value uses a substitution formatter")
    return HeaderValue(key, value, append), reasons


def _filters(per_filter: dict[str, Any], ctx: RouteContext
             ) -> tuple[FaultAbort | None, LocalRateLimit | None, Reasons, list[Guard]]:
    """Effect of the HCM's http filters on this route, with per-route overrides."""
    fault: FaultAbort | None = None
    limit: LocalRateLimit | None = None
    reasons: Reasons = []
    guards: list[Guard] = []
    for f in ctx.filters:
        override = per_filter.get(f.name)
        active = _active(f, override)
        if active and (is_opaque(f.config) or is_opaque(override)):
            reasons.append(f"http filter {f.kind}")  # a config L7FP can't read: not interpreted
            continue
        if not active or f.kind == "router":
            continue
        if f.kind == "fault":
            fault, more = fault_abort(override if override else f.config)
            reasons += more
        elif f.kind == "local_ratelimit":
            if override:
                limit, more = local_rate_limit(override)
                reasons += more
        elif f.kind == "rbac":
            if override:
                reasons.append("per-route RBAC override")
        elif f.kind == "cors":
            if override:
                guards += cors_guards(override)
        elif f.kind == "csrf":
            guards += csrf_guards(override if override else f.config)
        else:
            reasons.append(f"http filter {f.kind}")
    return fault, limit, reasons, guards


def _delay(per_filter: dict[str, Any], action: Action, ctx: RouteContext) -> tuple[Any, Reasons]:
    """The route's fault delay (fastpath.classify_delay), or why it needs Envoy."""
    delay, reasons = route_delay(ctx.filters, per_filter, action, ctx.caps.fault_runtime)
    if delay is not None and not ctx.caps.fault_delays:
        reasons.append("fault filter delay")
    return delay, reasons


def _active(f: HttpFilter, override: dict[str, Any] | None) -> bool:
    if override is None:
        return not f.disabled
    if type_name(override.get("@type", "")) == "envoy.config.route.v3.FilterConfig":
        return not override.get("disabled", False)
    return not override.get("disabled", False)


def fault_abort(cfg: dict[str, Any]) -> tuple[FaultAbort | None, Reasons]:
    """Envoy HTTPFault -> FaultAbort; a header-driven fault needs Envoy (the delay:
    fastpath.classify_delay)."""
    reasons = [f"fault filter {k}" for k in ("headers", "downstreamNodes",
                                              "upstreamCluster", "responseRateLimit") if k in cfg]
    abort = cfg.get("abort")
    if not abort:
        return None, reasons
    if "headerAbort" in abort or "grpcStatus" in abort:
        reasons.append("fault abort from request header / gRPC status")
    pct = abort.get("percentage", {})
    per = _per_million(pct)
    return FaultAbort(int(abort.get("httpStatus", 0)), per, "headerAbort" in abort), reasons


def _per_million(p: dict[str, Any]) -> int:
    denom = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}[p.get("denominator", "HUNDRED")]
    return int(p.get("numerator", 0)) * (1_000_000 // denom)


def local_rate_limit(cfg: dict[str, Any]) -> tuple[LocalRateLimit | None, Reasons]:
    """Envoy LocalRateLimit -> LocalRateLimit; None when the filter is not enabled.

    Envoy's default for an unset ``filter_enabled`` is 0 %: no limiting.
    """
    reasons = config_reasons(cfg)
    headers, more = reply_headers(cfg.get("responseHeadersToAdd", []))
    reasons += more
    bucket = cfg.get("tokenBucket")
    enabled = _per_million(cfg.get("filterEnabled", {}).get("defaultValue", {"numerator": 0}))
    enforced = _per_million(cfg.get("filterEnforced", {}).get("defaultValue", {"numerator": 0}))
    if not bucket or enabled == 0:
        return None, reasons
    if enabled != 1_000_000:
        reasons.append("local_ratelimit filter_enabled below 100%")
    status = status_code(cfg.get("status", {}).get("code")) or 429
    limit = LocalRateLimit(int(bucket.get("maxTokens", 0)), int(bucket.get("tokensPerFill", 1)),
                           duration_ms(bucket.get("fillInterval", "0s")) or 0, status,
                           enforced_per_million=enforced, response_headers=headers)
    return limit, reasons


def status_code(v: Any) -> int | None:
    """An envoy.type.v3.StatusCode from proto-JSON (enum name or number)."""
    if v is None or isinstance(v, int):
        return v
    from envoy_data_plane.envoy.type.v3 import StatusCode

    return int(StatusCode[v]) if v in StatusCode.__members__ else int(v)
