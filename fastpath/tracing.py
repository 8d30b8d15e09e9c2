"""HCM `tracing` on the kernel path: Envoy's sampling decision, written into
the x-request-id the kernel generates, and the settings and requests that
stay with Envoy.

Callers: `fastpath.classify` (`hcm_reasons`: why a tracing HCM stays with
Envoy; `sampling`, `overall` and `provider`: the listener's
`ListenerPlan.trace_sampling`, `trace_overall` and `trace_provider`;
`route_reasons`: per-route settings), `fastpath.inbound_merge`
(`inbound_sampling`: what a tracing inbound listener does to the caller's
decision), `fastpath.agent`
(`cflags`), `fastpath.synth_tables` (`ZIPKIN_FLAG` in the listener's `trace`
field for bpf_src/dp_xrid.h), `fastpath.reference` (`punts`, `b3_lines`,
`TRACE_REASON`) and the differential tests (`version_digit`,
`zipkin_forwards`: which of the ids the kernel generates are sampled). Pure
functions; the data path's half is bpf_src/dp_xrid.h.

What Envoy 1.40 does, seen with the binary (tests/split/test_tracing_envoy.py,
HTTP/1.1 from 127.0.0.1, use_remote_address off;
ConnectionManagerUtility::mutateTracingRequestHeader):

* The request id first (fastpath.request_id), then the decision. With the
  UUID extension's defaults (pack_trace_reason, use_request_id_for_trace_sampling)
  r = (the id's first 8 hex digits as an integer) % 10000; a request without
  trace context is sampled when r < random_sampling (a Percent, as
  10000 / 100.0 * value truncated; 10000 when unset) and r < overall_sampling
  (the same conversion), and its id's version digit (character 14) becomes
  ``9``; otherwise it stays ``4``. Exact per request over 100 requests at
  random_sampling 30 % and at 60 % with overall 30 %.
* A client's x-request-id is re-marked from its own digits (00000001-... got
  ``9`` at 30 %, 0000270f-... kept ``4``); x-client-trace-id makes it ``b``
  (client_sampling 100 %); x-envoy-force-trace is removed from the request
  and does not force (the id is sampled as without it: this client is
  external to Envoy); on a listener whose traffic_direction is not OUTBOUND,
  a client's x-envoy-decorator-operation is removed from the request. Such requests go to Envoy (the kernel's reason
  ``trace_header``), on every tracing listener.
* Without a provider (and no tracer in the bootstrap) nothing else is added:
  b3 and traceparent headers pass as sent.
* A route's ``decorator``: an OUTBOUND listener adds
  ``x-envoy-decorator-operation: <operation>`` to the upstream request right
  after x-request-id (the kernel: the route's first header add), any other
  puts it on the response (such routes stay with Envoy); with propagate
  false, neither. Routes
  with a per-route ``tracing`` (their own percentages) and, not compared
  with Envoy, routes with request mirrors (the shadow's trace_sampled).
* Responses: an OUTBOUND listener removes an upstream's
  x-envoy-decorator-operation from the response. The kernel forwards the
  response as the upstream sent it (docs/split.md "Known differences").
* The Zipkin provider (envoy.tracers.zipkin) adds x-b3-traceid, x-b3-spanid
  (the same 16 hex digits for a new trace) and x-b3-sampled (1 or 0, the
  decision above) to every request, after all other lines
  (x-envoy-expected-rq-timeout-ms and the route's), and POSTs a span to its collector for
  exactly the sampled ones. The kernel adds the b3 lines to an unsampled
  request and hands a sampled one to Envoy with the id it generated
  (digit 9): Envoy decides the same from it and reports the span
  (zipkin_forwards). A client's b3 / traceparent context is used by Envoy
  (a child span on an OUTBOUND listener): such requests go to Envoy. A
  Zipkin setting that changes the headers (trace_id_128bit,
  shared_span_context off, ...) and any other provider keep the listener
  with Envoy, named in the reason.
* A runtime layer (disk, RTDS, admin) can override tracing.random_sampling,
  tracing.global_enabled and tracing.client_enabled: the listener stays with
  Envoy, as fault percentages do.
* An inbound listener (traffic_direction INBOUND) with tracing: behind a
  caller's Envoy it keeps the caller's ids and b3 lines but samples the id
  again (`inbound_sampling`) and takes the caller's decorator line off.
  Such a listener is KERNEL (its route decorators too: `route_reasons` with
  `inbound`), merged only behind callers whose decision it keeps
  (fastpath.inbound_merge.trace_refusal); the rule and what was seen:
  docs/split.md "Tracing on the destination's inbound listener".
"""

from __future__ import annotations

import re
from typing import Any

from fastpath.envoy_model import bool_field, unwrapped

DENOMINATOR = 10000  # Envoy's FractionalPercent TEN_THOUSAND for the tracing percentages
# Request headers that change Envoy's decision or that Envoy removes on a
# tracing listener: such a request goes to Envoy (bpf_src/dp_xrid.h DP_R_TRACE)
TRACE_HEADERS = ("x-request-id", "x-client-trace-id", "x-envoy-force-trace",
                 "x-envoy-decorator-operation")
TRACE_REASON = "trace_header"  # fastpath.counters DP_REASONS[17]
# With the Zipkin provider also: any request carrying trace context goes to
# Envoy (names starting with x-b3-, and these)
ZIPKIN_HEADERS = ("b3", "traceparent", "tracestate")
B3_PREFIX = "x-b3-"
SAMPLED_REASON = "trace_sampled"  # fastpath.counters DP_REASONS[31]: Envoy reports the span
ZIPKIN_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
# ZipkinConfig fields that change no request header (the span's destination
# and encoding: Envoy reports the sampled requests' spans itself)
_ZIPKIN_SPAN_ONLY = {"@type", "collectorCluster", "collectorEndpoint", "collectorEndpointVersion",
                     "collectorHostname", "collectorService"}
# ... and those whose default the kernel reproduces (the root span's ids in b3)
_ZIPKIN_DEFAULTS: dict[str, Any] = {"sharedSpanContext": True, "traceId128bit": False,
                                    "splitSpansForRequest": False, "traceContextOption": "USE_B3"}
HEX16 = "[0-9a-f]{16}"
ZIPKIN_FLAG = 0x10000  # l7fp_listener.trace: the tracer is Zipkin (dp_xrid.h DP_TRACE_F_ZIPKIN)


def _percent(tracing: dict[str, Any], key: str) -> int:
    """A Percent field of HCM.Tracing as Envoy's numerator of 10000 (unset: 10000)."""
    if key not in tracing:
        return DENOMINATOR
    return int(DENOMINATOR / 100.0 * float(unwrapped(tracing[key])))


def _ext_flag(hcm: dict[str, Any], key: str) -> bool:
    ext = (hcm.get("requestIdExtension") or {}).get("typedConfig") or {}
    return bool_field(ext, key, True)


def _packs(hcm: dict[str, Any]) -> bool:
    """The UUID extension writes the decision into the id and takes it from the id."""
    return _ext_flag(hcm, "packTraceReason") and _ext_flag(hcm, "useRequestIdForTraceSampling")


def sampling(hcm: dict[str, Any]) -> int | None:
    """The listener's `trace_sampling`: None without `tracing`; else how many
    of the 10000 values of r get the sampled digit (0 when the UUID extension
    does not pack or sample from the id: the digit then stays ``4``)."""
    tracing = hcm.get("tracing")
    if tracing is None:
        return None
    if not _packs(hcm):
        return 0
    return min(_percent(tracing, "randomSampling"), _percent(tracing, "overallSampling"))


def overall(hcm: dict[str, Any]) -> int:
    """The listener's `trace_overall`: how many of the 10000 values of r may
    keep a sampled digit (overall_sampling as Envoy converts it; 10000
    without tracing or when the UUID extension does not pack or sample from
    the id: Envoy then never unmarks one)."""
    tracing = hcm.get("tracing")
    if tracing is None or not _packs(hcm):
        return DENOMINATOR
    return _percent(tracing, "overallSampling")


def inbound_sampling(caller: int | None, sampling: int, overall_: int) -> int:
    """How many of the 10000 values of r arrive sampled at the app behind an
    inbound listener with `trace_sampling` `sampling` and `trace_overall`
    `overall_`, when the caller's listener marked r < `caller` sampled (None:
    no tracing, every id unsampled). Envoy's inbound side
    (ConnectionManagerUtility::mutateTracingRequestHeader, seen in
    tests/split/test_tracing_inbound_envoy.py): an unsampled id gets the
    sampled digit when r < its random_sampling, then any loses it when
    r >= its overall_sampling; so r < min(max(caller, random), overall),
    which is min(max(caller, sampling), overall) as sampling is
    min(random, overall)."""
    return min(max(caller or 0, sampling), overall_)


def hcm_reasons(hcm: dict[str, Any], runtime: str = "") -> list[str]:
    """Why this HCM's tracing keeps the listener with Envoy ([] when the
    kernel reproduces it, or without tracing). `runtime`: the bootstrap's
    runtime layers (KernelCaps.fault_runtime). An INBOUND listener's tracing
    depends on its callers too: fastpath.inbound_merge (`trace_refusal`)."""
    tracing = hcm.get("tracing")
    if tracing is None:
        return []
    out = provider_reasons(tracing.get("provider"))
    if runtime and _packs(hcm):
        out.append(f"tracing percentages may come from the runtime ({runtime})")
    return out


def provider(hcm: dict[str, Any]) -> str:
    """The listener's `trace_provider`: "zipkin" for a Zipkin provider the
    kernel reproduces (provider_reasons empty), else ""."""
    p = (hcm.get("tracing") or {}).get("provider")
    return "zipkin" if p and not provider_reasons(p) else ""


def provider_reasons(p: dict[str, Any] | None) -> list[str]:
    """Why the tracer `p` (HCM.Tracing.provider) needs Envoy: any but Zipkin,
    and Zipkin with a setting that changes its b3 headers."""
    if not p:
        return []
    cfg = p.get("typedConfig") or {}
    name = p.get("name") or cfg.get("@type", "?")
    if cfg.get("@type") != ZIPKIN_TYPE:
        return [f"http_connection_manager tracing provider {name} (trace headers and spans)"]
    other = sorted(k for k, v in cfg.items() if _changes_headers(k, v))
    return [f"http_connection_manager tracing provider {name} {k}" for k in other]


def _changes_headers(key: str, v: Any) -> bool:
    if key in _ZIPKIN_SPAN_ONLY:
        return False
    return key not in _ZIPKIN_DEFAULTS or unwrapped(v) != _ZIPKIN_DEFAULTS[key]


def route_reasons(route: dict[str, Any], egress: bool, inbound: bool = False) -> list[str]:
    """Why a route of a tracing HCM stays with Envoy (a route dict as the HCM
    gives it); `egress`: the listener's traffic_direction is OUTBOUND,
    `inbound`: INBOUND (its decorator's response header never reaches a
    client whose listener traces and is OUTBOUND: that Envoy removes it, and
    fastpath.inbound_merge merges such a listener only behind those)."""
    out = []
    if decorator_operation(route) and not egress and not inbound:
        out.append("route decorator on a tracing listener that is not OUTBOUND "
                   "(x-envoy-decorator-operation on the response)")
    if route.get("tracing"):
        out.append("route tracing percentages")
    if (route.get("route") or {}).get("requestMirrorPolicies"):
        # the shadow's trace_sampled and id with tracing on: not compared with Envoy
        out.append("route request mirror on a tracing listener")
    return out


def decorator_operation(route: dict[str, Any]) -> str:
    """The operation Envoy propagates for a route's decorator ("" when none or
    propagate false). On an OUTBOUND tracing listener Envoy sends it upstream
    as x-envoy-decorator-operation, the first line after x-request-id (before
    x-envoy-expected-rq-timeout-ms and the route's lines): fastpath.classify
    makes it the route's first header add."""
    dec = route.get("decorator") or {}
    return str(dec.get("operation", "")) if bool_field(dec, "propagate", True) else ""


def cflags(plan: Any) -> tuple[str, ...]:
    """-DDP_TRACE=1 for this KernelPlan (fastpath.agent) when a KERNEL listener
    has tracing, -DDP_TRACE_ZIPKIN=1 too when one has the Zipkin tracer;
    without, that code is compiled out."""
    kernel = [lp for lp in plan.listeners if lp.verdict.value == "KERNEL" and lp.trace_sampling is not None]
    if not kernel:
        return ()
    return ("-DDP_TRACE=1",) + (("-DDP_TRACE_ZIPKIN=1",) if any(lp.trace_provider for lp in kernel) else ())


def punts(name: str, trace_provider: str) -> bool:
    """Does a request header `name` (lower case) hand a request on a tracing
    listener to Envoy (dp_xrid.h DP_R_TRACE)?"""
    return name in TRACE_HEADERS or bool(trace_provider) and (
        name.startswith(B3_PREFIX) or name in ZIPKIN_HEADERS)


def b3_lines() -> tuple[tuple[str, str], ...]:
    """The lines the kernel appends (after the route's) to a Zipkin listener's
    unsampled request, as Envoy's tracer does: a new trace, its id also the
    span's (16 hex digits, the same value), not sampled. Values as regexes."""
    return (("x-b3-traceid", HEX16), ("x-b3-spanid", HEX16), ("x-b3-sampled", "0"))


def zipkin_forwards(request_id: str, trace_sampling: int | None) -> bool:
    """On a Zipkin listener: does the kernel forward the request whose id it
    generated (not sampled), or hand it to Envoy (sampled: Envoy reports the
    span; reason trace_sampled)?"""
    return version_digit(request_id, trace_sampling) == "4"


def r_value(request_id: str) -> int | None:
    """Envoy's r for an id (UUIDRequestIDExtension::getInteger % 10000), None
    when its first 8 characters are not hex."""
    head = request_id[:8]
    if len(head) < 8 or not re.fullmatch(r"[0-9a-fA-F]{8}", head):
        return None
    return int(head, 16) % DENOMINATOR


def version_digit(request_id: str, trace_sampling: int | None) -> str:
    """The version digit Envoy (and the kernel) gives an id it generated on a
    listener with `trace_sampling` (ListenerPlan.trace_sampling)."""
    r = r_value(request_id)
    return "9" if trace_sampling and r is not None and r < trace_sampling else "4"


def traced_id_pattern(trace_sampling: int | None) -> str:
    """The regex of an id the data path adds on such a listener: a UUID v4
    whose version digit may be 9 (version_digit says which, per id)."""
    version = "[49]" if trace_sampling else "4"
    return rf"[0-9a-f]{{8}}-[0-9a-f]{{4}}-{version}[0-9a-f]{{3}}-[89ab][0-9a-f]{{3}}-[0-9a-f]{{12}}"
