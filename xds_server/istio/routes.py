"""VirtualService `http:` rules -> Envoy route dicts, the way istiod writes them.

Called by `xds_server.istio.sidecar` for each (service host, port) route
table of a sidecar, and by `xds_server.istio.reader` for the split coverage.
Produces Envoy JSON dicts (camelCase as accepted by betterproto2 `from_dict`);
it never builds messages itself. Istio defaults applied here: route timeout
disabled (0s) and the default retry policy (2 attempts on connect-failure,
refused-stream, unavailable, cancelled, 503) when `retries` is absent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .objects import Obj, Warnings, as_list, check_fields

FAULT = "envoy.filters.http.fault"
CORS = "envoy.filters.http.cors"
TYPE_FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
TYPE_CORS = "type.googleapis.com/envoy.config.route.v3.CorsPolicy"

HTTP_FIELDS = {"name", "match", "route", "redirect", "directResponse", "delegate", "rewrite",
               "timeout", "retries", "fault", "mirror", "mirrorPercentage", "mirrors",
               "mirror_percent", "mirrorPercent", "corsPolicy", "headers"}
MATCH_FIELDS = {"name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels",
                "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace",
                "statPrefix"}
REDIRECT_CODES = {301: "MOVED_PERMANENTLY", 302: "FOUND", 303: "SEE_OTHER",
                  307: "TEMPORARY_REDIRECT", 308: "PERMANENT_REDIRECT"}

# host (as written), subset, port -> Envoy cluster name
ClusterNamer = Callable[[str, str, int | None], str]


def default_route_retry(w: Warnings, default_retries: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Retry policy of a route istiod writes itself (no VirtualService)."""
    return _retries(w, None, "defaultHttpRetryPolicy", default_retries)


def istio_default_retry() -> dict[str, Any]:
    """istiod's default retry policy for routes without `retries:`."""
    return {
        "retryOn": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "numRetries": 2,
        "retryHostPredicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "hostSelectionRetryMaxAttempts": "5",
        "retriableStatusCodes": [503],
    }


def duration(text: Any) -> str:
    """Istio durations ('1.5s', '100ms', '1m', '2h') -> protobuf JSON ('1.5s')."""
    s = str(text).strip()
    for unit, mult in (("ms", 0.001), ("us", 1e-6), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if s.endswith(unit):
            try:
                return f"{float(s[: -len(unit)]) * mult:.6f}".rstrip("0").rstrip(".") + "s"
            except ValueError:
                break
    raise ValueError(f"bad duration {text!r}")


def string_match(w: Warnings, obj: Obj, path: str, m: Any, ignore_case: bool = False) -> dict[str, Any]:
    """Istio StringMatch {exact|prefix|regex} -> Envoy StringMatcher."""
    m = check_fields(w, obj, path, m, {"exact", "prefix", "regex"})
    out: dict[str, Any]
    if "exact" in m:
        out = {"exact": str(m["exact"])}
    elif "prefix" in m:
        out = {"prefix": str(m["prefix"])}
    elif "regex" in m:
        out = {"safeRegex": {"regex": str(m["regex"])}}
    else:
        return {}
    if ignore_case and "safeRegex" not in out:
        out["ignoreCase"] = True
    return out


def fraction(percent: float) -> dict[str, Any]:
    return {"numerator": round(percent * 10000), "denominator": "MILLION"}


def _percentage(w: Warnings, obj: Obj, path: str, spec: Mapping[str, Any]) -> float:
    if "percentage" in spec:
        return float((spec.get("percentage") or {}).get("value", 100.0))
    if "percent" in spec:
        return float(spec["percent"])
    return 100.0


def convert_match(w: Warnings, obj: Obj, path: str, m: Mapping[str, Any]) -> dict[str, Any]:
    """One HTTPMatchRequest -> Envoy RouteMatch (without port/source, handled by caller)."""
    m = check_fields(w, obj, path, m, MATCH_FIELDS)
    ignore_case = bool(m.get("ignoreUriCase"))
    out: dict[str, Any] = {}
    raw_uri = m.get("uri")
    if isinstance(raw_uri, Mapping) and "pathSeparatedPrefix" in raw_uri:  # from Gateway API
        uri: dict[str, Any] = {"pathSeparatedPrefix": str(raw_uri["pathSeparatedPrefix"])}
    else:
        uri = string_match(w, obj, f"{path}.uri", raw_uri)
    if "pathSeparatedPrefix" in uri:
        out["pathSeparatedPrefix"] = uri["pathSeparatedPrefix"]
    elif "exact" in uri:
        out["path"] = uri["exact"]
    elif "prefix" in uri:
        out["prefix"] = uri["prefix"]
    elif "safeRegex" in uri:
        out["safeRegex"] = uri["safeRegex"]
    else:
        out["prefix"] = "/"
    if ignore_case:
        out["caseSensitive"] = False
    headers = []
    for key, pseudo in (("method", ":method"), ("authority", ":authority"), ("scheme", ":scheme")):
        if key in m:
            headers.append({"name": pseudo, "stringMatch": string_match(w, obj, f"{path}.{key}", m[key])})
    for name, spec in (m.get("headers") or {}).items():
        headers.append(_header(w, obj, f"{path}.headers.{name}", name, spec, invert=False))
    for name, spec in (m.get("withoutHeaders") or {}).items():
        headers.append(_header(w, obj, f"{path}.withoutHeaders.{name}", name, spec, invert=True))
    if headers:
        out["headers"] = headers
    params = []
    for name, spec in (m.get("queryParams") or {}).items():
        sm = string_match(w, obj, f"{path}.queryParams.{name}", spec)
        params.append({"name": name, "stringMatch": sm} if sm else {"name": name, "presentMatch": True})
    if params:
        out["queryParameters"] = params
    if m.get("sourceNamespace"):
        w.add(obj, f"{path}.sourceNamespace", "applied at generation time by the client's namespace")
    return out


def _header(w: Warnings, obj: Obj, path: str, name: str, spec: Any, invert: bool) -> dict[str, Any]:
    sm = string_match(w, obj, path, spec)
    h: dict[str, Any] = {"name": name.lower()}
    if sm:
        h["stringMatch"] = sm
    else:
        h["presentMatch"] = True
    if invert:
        h["invertMatch"] = True
    return h


def match_applies(m: Mapping[str, Any], port: int, labels: Mapping[str, str], namespace: str,
                  gateway_routes: bool = False) -> bool:
    """Istio evaluates port, sourceLabels, gateways and sourceNamespace per proxy."""
    if "port" in m and int(m["port"]) != port:
        return False
    src = m.get("sourceLabels") or {}
    if any(labels.get(k) != v for k, v in src.items()):
        return False
    gws = m.get("gateways")
    if gws and "mesh" not in gws and not gateway_routes:
        return False
    return not (m.get("sourceNamespace") and m["sourceNamespace"] != namespace)


def gateway_refs(names: Any, namespace: str) -> set[str]:
    """`NS/NAME` of each gateway a `gateways:` list names, `NAME` alone meaning
    one in `namespace` (the VirtualService's), as istiod reads them; `mesh`
    stays `mesh`. Read by `convert_http` and xds_server.istio.gateway."""
    return {str(g) if str(g) == "mesh" or "/" in str(g) else f"{namespace}/{g}"
            for g in names or []}


def placement_of(m: Mapping[str, Any], vs_gateways: Any) -> str:
    """Where Istio applies a match of a VirtualService bound to `vs_gateways`:
    "mesh" (the sidecars, `mesh` or no gateways) or "gateway" (gateways only).
    A VirtualService not bound to `mesh` never reaches a sidecar, whatever its
    matches say; in one that is, a match's own `gateways` override the
    VirtualService's. Read by `l7fp split` (xds_server.istio.reader)."""
    if vs_gateways and "mesh" not in vs_gateways:
        return "gateway"
    return "mesh" if "mesh" in (m.get("gateways") or ["mesh"]) else "gateway"


def placements(vs: Obj) -> set[str]:
    """The placements (placement_of) of every match of the VirtualService `vs`."""
    gws = vs.spec.get("gateways")
    return {placement_of(m if isinstance(m, Mapping) else {}, gws)
            for rule in vs.spec.get("http") or [] if isinstance(rule, Mapping)
            for m in (rule.get("match") if isinstance(rule.get("match"), list) else None) or [{}]}


def convert_http(
    w: Warnings, obj: Obj, idx: int, rule: Mapping[str, Any], namer: ClusterNamer,
    port: int, labels: Mapping[str, str], namespace: str, gateway_routes: bool = False,
    default_retries: Mapping[str, Any] | None = None, placement: str = "", gateway: str = "",
) -> list[dict[str, Any]]:
    """One `http[idx]` rule -> Envoy routes (one per applicable match).

    `default_retries`: MeshConfig.defaultHttpRetryPolicy (an HTTPRetry), used
    for rules without `retries:`; None means istiod's built-in default.
    `placement` ("mesh" or "gateway", `l7fp split`): only the matches with
    that placement (placement_of); "" keeps every applicable match.
    `gateway` (`NS/NAME`, xds_server.istio.gateway): the route table is that
    Istio Gateway's; a match whose own `gateways:` does not name it is left out.
    """
    path = f"spec.http[{idx}]"
    rule = check_fields(w, obj, path, rule, HTTP_FIELDS)
    try:
        action = _action(w, obj, path, rule, namer, port, default_retries)
        if action is None:
            return []
        matches = as_list(w, obj, f"{path}.match", rule.get("match")) or [{}]
        routes = []
        for j, m in enumerate(matches):
            if not match_applies(m or {}, port, labels, namespace, gateway_routes):
                continue
            if placement and placement_of(m or {}, obj.spec.get("gateways")) != placement:
                continue
            if gateway and (m or {}).get("gateways") and \
                    gateway not in gateway_refs(m["gateways"], obj.namespace):
                continue
            route = {"name": str(rule.get("name") or f"{obj.name}.{obj.namespace}.{idx}"),
                     "match": convert_match(w, obj, f"{path}.match[{j}]", m or {})}
            route.update(action)
            routes.append(route)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        w.add(obj, path, f"malformed ({exc!r}); rule ignored")
        return []
    return routes


def _action(w: Warnings, obj: Obj, path: str, rule: Mapping[str, Any], namer: ClusterNamer,
            port: int, default_retries: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    per_filter: dict[str, Any] = {}
    if "delegate" in rule:
        w.add(obj, f"{path}.delegate", "delegation is unsupported; rule ignored")
        return None
    if "redirect" in rule:
        out["redirect"] = _redirect(w, obj, f"{path}.redirect", rule["redirect"])
    elif "directResponse" in rule:
        out["directResponse"] = _direct(w, obj, f"{path}.directResponse", rule["directResponse"])
    elif "route" in rule:
        out["route"] = _route_action(w, obj, path, rule, namer, port, default_retries)
    else:
        w.add(obj, path, "rule has no route, redirect or directResponse; ignored")
        return None
    if "fault" in rule:
        per_filter[FAULT] = _fault(w, obj, f"{path}.fault", rule["fault"])
    if "corsPolicy" in rule:
        per_filter[CORS] = _cors(w, obj, f"{path}.corsPolicy", rule["corsPolicy"])
    if per_filter:
        out["typedPerFilterConfig"] = per_filter
    _headers_ops(w, obj, f"{path}.headers", rule.get("headers"), out)
    return out


def _route_action(w: Warnings, obj: Obj, path: str, rule: Mapping[str, Any],
                  namer: ClusterNamer, port: int,
                  default_retries: Mapping[str, Any] | None = None) -> dict[str, Any]:
    dests = as_list(w, obj, f"{path}.route", rule.get("route"))
    # As istiod's setTimeout for sidecars: the VirtualService timeout (else none)
    # and the deprecated max_grpc_timeout equal to it. Not max_stream_duration:
    # with that on a route Envoy ignores `timeout` (istiod sets it only on the
    # inbound default route and for proxyless gRPC).
    timeout = duration(rule["timeout"]) if "timeout" in rule else "0s"
    ra: dict[str, Any] = {"timeout": timeout, "maxGrpcTimeout": timeout}
    entries = []
    for i, d in enumerate(dests):
        d = check_fields(w, obj, f"{path}.route[{i}]", d, {"destination", "weight", "headers"})
        dest = check_fields(w, obj, f"{path}.route[{i}].destination", d.get("destination"),
                            {"host", "subset", "port"})
        dport = (dest.get("port") or {}).get("number")
        entry: dict[str, Any] = {"name": namer(str(dest.get("host", "")), str(dest.get("subset") or ""),
                                               int(dport) if dport else None),
                                 "weight": int(d.get("weight", 100 if len(dests) == 1 else 0))}
        _headers_ops(w, obj, f"{path}.route[{i}].headers", d.get("headers"), entry)
        entries.append(entry)
    entries = [e for e in entries if e["weight"] > 0] or entries[:1]
    if len(entries) == 1:
        ra["cluster"] = entries[0].pop("name")
        entries[0].pop("weight")
        ra.update(entries[0])  # per-destination header ops become route-level ones
        _move_header_ops_out(ra)
    else:
        ra["weightedClusters"] = {"clusters": entries}
    _rewrite(w, obj, f"{path}.rewrite", rule.get("rewrite"), ra)
    ra["retryPolicy"] = _retries(w, obj, f"{path}.retries", rule.get("retries", default_retries))
    if ra["retryPolicy"] is None:
        del ra["retryPolicy"]
    mirrors = _mirrors(w, obj, path, rule, namer)
    if mirrors:
        ra["requestMirrorPolicies"] = mirrors
    return ra


_HEADER_KEYS = ("requestHeadersToAdd", "requestHeadersToRemove",
                "responseHeadersToAdd", "responseHeadersToRemove")


def _move_header_ops_out(ra: dict[str, Any]) -> None:
    # RouteAction has no header fields; the caller's route gets them via _lift.
    lifted = {k: ra.pop(k) for k in _HEADER_KEYS if k in ra}
    if lifted:
        ra["_lift"] = lifted


def lift_header_ops(route: dict[str, Any]) -> dict[str, Any]:
    """Move header ops parked in the RouteAction onto the Route (Envoy's shape)."""
    ra = route.get("route") or {}
    for k, v in (ra.pop("_lift", None) or {}).items():
        route.setdefault(k, []).extend(v)
    return route


def _headers_ops(w: Warnings, obj: Obj, path: str, spec: Any, out: dict[str, Any]) -> None:
    spec = check_fields(w, obj, path, spec, {"request", "response"})
    for side, prefix in (("request", "request"), ("response", "response")):
        ops = check_fields(w, obj, f"{path}.{side}", spec.get(side), {"set", "add", "remove"})
        adds = [{"header": {"key": k, "value": str(v)}, "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in (ops.get("set") or {}).items()]
        adds += [{"header": {"key": k, "value": str(v)}, "appendAction": "APPEND_IF_EXISTS_OR_ADD"}
                 for k, v in (ops.get("add") or {}).items()]
        if adds:
            out.setdefault(f"{prefix}HeadersToAdd", []).extend(adds)
        if ops.get("remove"):
            out.setdefault(f"{prefix}HeadersToRemove", []).extend(str(h) for h in ops["remove"])


def _rewrite(w: Warnings, obj: Obj, path: str, spec: Any, ra: dict[str, Any]) -> None:
    spec = check_fields(w, obj, path, spec, {"uri", "authority", "uriRegexRewrite"})
    if "uri" in spec:
        ra["prefixRewrite"] = str(spec["uri"])
    if "uriRegexRewrite" in spec:
        rr = spec["uriRegexRewrite"] or {}
        ra["regexRewrite"] = {"pattern": {"regex": str(rr.get("match", ""))},
                              "substitution": str(rr.get("rewrite", ""))}
    if "authority" in spec:
        ra["hostRewriteLiteral"] = str(spec["authority"])


def _retries(w: Warnings, obj: Obj | None, path: str, spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return istio_default_retry()
    spec = check_fields(w, obj, path, spec, {"attempts", "perTryTimeout", "retryOn",
                                             "retryRemoteLocalities", "retryIgnorePreviousHosts"})
    attempts = int(spec.get("attempts", 2))
    if attempts <= 0:
        return None
    policy = istio_default_retry()
    policy["numRetries"] = attempts
    if "perTryTimeout" in spec:
        policy["perTryTimeout"] = duration(spec["perTryTimeout"])
    if "retryOn" in spec:
        words = [x.strip() for x in str(spec["retryOn"]).split(",") if x.strip()]
        codes = [int(x) for x in words if x.isdigit()]
        names = [x for x in words if not x.isdigit()]
        if codes and "retriable-status-codes" not in names:
            names.append("retriable-status-codes")
        policy["retryOn"] = ",".join(names)
        if codes:
            policy["retriableStatusCodes"] = codes
        else:
            policy.pop("retriableStatusCodes")
    if spec.get("retryIgnorePreviousHosts") is False:
        policy.pop("retryHostPredicate")
    return policy


def _fault(w: Warnings, obj: Obj, path: str, spec: Any) -> dict[str, Any]:
    spec = check_fields(w, obj, path, spec, {"delay", "abort"})
    out: dict[str, Any] = {"@type": TYPE_FAULT}
    if "delay" in spec:
        d = check_fields(w, obj, f"{path}.delay", spec["delay"],
                         {"fixedDelay", "percentage", "percent", "exponentialDelay"})
        if "exponentialDelay" in d:
            w.add(obj, f"{path}.delay.exponentialDelay", "unsupported (Istio ignores it too); ignored")
        if "fixedDelay" in d:
            out["delay"] = {"fixedDelay": duration(d["fixedDelay"]),
                            "percentage": fraction(_percentage(w, obj, path, d))}
    if "abort" in spec:
        a = check_fields(w, obj, f"{path}.abort", spec["abort"],
                         {"httpStatus", "grpcStatus", "http2Error", "percentage"})
        abort: dict[str, Any] = {"percentage": fraction(_percentage(w, obj, path, a))}
        if "httpStatus" in a:
            abort["httpStatus"] = int(a["httpStatus"])
        elif "grpcStatus" in a:
            abort["grpcStatus"] = _grpc_code(a["grpcStatus"])
        else:
            w.add(obj, f"{path}.abort", "no httpStatus/grpcStatus; abort ignored")
            return out
        out["abort"] = abort
    return out


_GRPC = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
         "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
         "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
         "UNAUTHENTICATED"]


def _grpc_code(v: Any) -> int:
    return int(v) if str(v).isdigit() else _GRPC.index(str(v).upper())


def _cors(w: Warnings, obj: Obj, path: str, spec: Any) -> dict[str, Any]:
    spec = check_fields(w, obj, path, spec, {"allowOrigins", "allowOrigin", "allowMethods",
                                             "allowHeaders", "exposeHeaders", "maxAge",
                                             "allowCredentials", "unmatchedPreflights"})
    origins = [string_match(w, obj, f"{path}.allowOrigins", o) for o in spec.get("allowOrigins") or []]
    origins += [{"exact": str(o)} for o in spec.get("allowOrigin") or []]
    out: dict[str, Any] = {"@type": TYPE_CORS, "allowOriginStringMatch": [o for o in origins if o]}
    for key in ("allowMethods", "allowHeaders", "exposeHeaders"):
        if spec.get(key):
            out[key] = ",".join(str(x) for x in spec[key])
    if "maxAge" in spec:
        out["maxAge"] = str(int(float(duration(spec["maxAge"])[:-1])))
    if "allowCredentials" in spec:
        out["allowCredentials"] = bool(spec["allowCredentials"])
    return out


def _redirect(w: Warnings, obj: Obj, path: str, spec: Any) -> dict[str, Any]:
    spec = check_fields(w, obj, path, spec, {"uri", "authority", "port", "derivePort",
                                             "scheme", "redirectCode"})
    out: dict[str, Any] = {}
    if "uri" in spec:
        out["pathRedirect"] = str(spec["uri"])
    if "authority" in spec:
        out["hostRedirect"] = str(spec["authority"])
    if "port" in spec:
        out["portRedirect"] = int(spec["port"])
    if "scheme" in spec:
        out["schemeRedirect"] = str(spec["scheme"])
    code = int(spec.get("redirectCode", 301))
    if code not in REDIRECT_CODES:
        w.add(obj, f"{path}.redirectCode", f"{code} has no Envoy equivalent; using 301")
        code = 301
    out["responseCode"] = REDIRECT_CODES[code]
    return out


def _direct(w: Warnings, obj: Obj, path: str, spec: Any) -> dict[str, Any]:
    spec = check_fields(w, obj, path, spec, {"status", "body"})
    out: dict[str, Any] = {"status": int(spec.get("status", 200))}
    body = check_fields(w, obj, f"{path}.body", spec.get("body"), {"string", "bytes"})
    if "string" in body:
        out["body"] = {"inlineString": str(body["string"])}
    elif "bytes" in body:
        out["body"] = {"inlineBytes": str(body["bytes"])}
    return out


def _mirrors(w: Warnings, obj: Obj, path: str, rule: Mapping[str, Any],
             namer: ClusterNamer) -> list[dict[str, Any]]:
    out = []
    items: list[tuple[Any, float]] = []
    if "mirror" in rule:
        legacy = rule.get("mirrorPercent", rule.get("mirror_percent", 100.0))  # deprecated spellings
        pct = (rule.get("mirrorPercentage") or {}).get("value", legacy)
        items.append((rule["mirror"], float(pct)))
    for m in rule.get("mirrors") or []:
        items.append((m.get("destination"), float((m.get("percentage") or {}).get("value", 100.0))))
    for dest, pct in items:
        dest = check_fields(w, obj, f"{path}.mirror", dest, {"host", "subset", "port"})
        dport = (dest.get("port") or {}).get("number")
        cluster = namer(str(dest.get("host", "")), str(dest.get("subset") or ""),
                        int(dport) if dport else None)
        out.append({"cluster": cluster, "runtimeFraction": {"defaultValue": fraction(pct)}})
    return out
