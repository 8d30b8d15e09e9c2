"""HCM `tracing` on the kernel path: Envoy's sampling decision, written into
the x-request-id the kernel generates, and the settings and requests that
stay with Envoy.

Callers: `fastpath.request_id.hcm_reasons` (`hcm_reasons`: why a tracing HCM
stays with Envoy), `fastpath.classify` (`sampling`: the listener's
`ListenerPlan.trace_sampling`; `route_reasons`: per-route settings),
`fastpath.synth_tables` (the listener's `trace` field for bpf_src/dp_xrid.h),
`fastpath.reference` (`TRACE_HEADERS`, `traced_id_pattern`) and the
differential tests (`version_digit`). Pure functions.

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
  ``x-envoy-decorator-operation: <operation>`` to the upstream request, any
  other puts it on the response: such routes stay with Envoy, as do routes
  with a per-route ``tracing`` (their own percentages) and, not compared
  with Envoy, routes with request mirrors (the shadow's trace_sampled).
* Responses: an OUTBOUND listener removes an upstream's
  x-envoy-decorator-operation from the response. The kernel forwards the
  response as the upstream sent it (docs/split.md "Known differences").
* The Zipkin provider (envoy.tracers.zipkin) adds x-b3-traceid, x-b3-spanid
  (the same 16 hex digits for a new trace) and x-b3-sampled (1 or 0, the
  decision above) to every request, and POSTs spans to its collector: any
  provider keeps the listener with Envoy, its name as the reason.
* A runtime layer (disk, RTDS, admin) can override tracing.random_sampling,
  tracing.global_enabled and tracing.client_enabled: the listener stays with
  Envoy, as fault percentages do.
* An inbound listener (traffic_direction INBOUND) with tracing stays with
  Envoy: its sidecar samples the caller's id again with its own percentages,
  which the kernel (skipping that sidecar) does not.
"""

from __future__ import annotations

import re
from typing import Any

DENOMINATOR = 10000  # Envoy's FractionalPercent TEN_THOUSAND for the tracing percentages
# Request headers that change Envoy's decision or that Envoy removes on a
# tracing listener: such a request goes to Envoy (bpf_src/dp_xrid.h DP_R_TRACE)
TRACE_HEADERS = ("x-request-id", "x-client-trace-id", "x-envoy-force-trace",
                 "x-envoy-decorator-operation")
TRACE_REASON = "trace_header"  # fastpath.counters DP_REASONS[17]


def _percent(tracing: dict[str, Any], key: str) -> int:
    """A Percent field of HCM.Tracing as Envoy's numerator of 10000 (unset: 10000)."""
    if key not in tracing:
        return DENOMINATOR
    value = tracing[key].get("value", 0.0) if isinstance(tracing[key], dict) else tracing[key]
    return int(DENOMINATOR / 100.0 * float(value))


def _ext_flag(hcm: dict[str, Any], key: str) -> bool:
    ext = (hcm.get("requestIdExtension") or {}).get("typedConfig") or {}
    v = ext.get(key, True)
    return bool(v.get("value", False) if isinstance(v, dict) else v)


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


def hcm_reasons(hcm: dict[str, Any], inbound: bool, runtime: str = "") -> list[str]:
    """Why this HCM's tracing keeps the listener with Envoy ([] when the
    kernel reproduces it, or without tracing). `inbound`: the listener's
    traffic_direction is INBOUND; `runtime`: the bootstrap's runtime layers
    (KernelCaps.fault_runtime)."""
    tracing = hcm.get("tracing")
    if tracing is None:
        return []
    provider = tracing.get("provider")
    if provider:
        name = provider.get("name") or (provider.get("typedConfig") or {}).get("@type", "?")
        return [f"http_connection_manager tracing provider {name} (trace headers and spans)"]
    out = []
    if inbound:
        out.append("http_connection_manager tracing on an inbound listener (its sidecar samples "
                   "the caller's x-request-id again)")
    if runtime and _packs(hcm):
        out.append(f"tracing percentages may come from the runtime ({runtime})")
    return out


def route_reasons(route: dict[str, Any]) -> list[str]:
    """Why a route of a tracing HCM stays with Envoy (a route dict as the HCM
    gives it)."""
    out = []
    if route.get("decorator"):
        out.append("route decorator on a tracing listener (x-envoy-decorator-operation)")
    if route.get("tracing"):
        out.append("route tracing percentages")
    if (route.get("route") or {}).get("requestMirrorPolicies"):
        # the shadow's trace_sampled and id with tracing on: not compared with Envoy
        out.append("route request mirror on a tracing listener")
    return out


def needs_trace(plan: Any) -> bool:
    """-DDP_TRACE=1 for this KernelPlan (fastpath.agent): a KERNEL listener has
    tracing; without one the tracing code is compiled out."""
    return any(lp.trace_sampling is not None and lp.verdict.value == "KERNEL" for lp in plan.listeners)


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
