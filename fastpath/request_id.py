"""x-forwarded-proto and x-request-id: what Envoy's HttpConnectionManager adds
to a request, and which HCM settings the kernel path reproduces.

Callers: `fastpath.classify` (`hcm_reasons`: the listener's routes stay with
Envoy for a setting the kernel does not reproduce, so a KERNEL listener has
the defaults and the plan carries none of them), `fastpath.reference`
(`added_headers`: the model of bpf_src/dp_xrid.h) and the differential tests
(`UUID4`, `normalized`).
Pure functions; the data path's half is bpf_src/dp_xrid.h.

What Envoy 1.40 does, seen with the binary (tests/split/test_request_id_envoy.py,
HTTP/1.1 from 127.0.0.1; ConnectionManagerUtility::mutateRequestHeaders):

* use_remote_address off (Istio's sidecars, the local mesh's, Envoy's
  default): no request is an edge request. A request without
  x-forwarded-proto gets ``x-forwarded-proto: http`` appended after its
  headers, then one without x-request-id gets ``x-request-id: <UUID v4>``
  (lower-case hex); a client's header is kept, value and place. Both come
  before the router's headers (x-envoy-expected-rq-timeout-ms, then the
  route's adds: fastpath.classify_route._router_headers).
* use_remote_address on: a client not in internal_address_config (empty by
  default in 1.40: 127.0.0.1 is external, so is any 198.18.0.0/15 address) is
  an edge request: x-forwarded-for gets the client's address (the listener's
  own for a loopback client), x-envoy-external-address is set,
  x-forwarded-proto is overwritten with ``http`` and x-request-id with a new
  UUID unless preserve_external_request_id. The kernel does none of that: such
  a listener stays with Envoy.
* generate_request_id false: no x-request-id is added (x-forwarded-proto is).
* always_set_request_id_in_response: the response carries the request id.
* tracing set (with the UUID extension's pack_trace_reason and
  use_request_id_for_trace_sampling, their defaults): the id's version digit
  carries Envoy's sampling decision (``9`` sampled, which is every request
  with the default 100 % random_sampling): fastpath.tracing says what the
  kernel reproduces (without a provider) and what stays with Envoy.
"""

from __future__ import annotations

import re
from typing import Any

from fastpath.envoy_model import bool_field
from fastpath.tracing import traced_id_pattern

XFP = "x-forwarded-proto"
XRID = "x-request-id"
# What the model says an added x-request-id is: any fresh UUID v4 (its value
# is random, Envoy's and the kernel's alike)
UUID4_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
UUID4 = re.compile(UUID4_PATTERN)
UUID_EXTENSION = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"


def hcm_reasons(hcm: dict[str, Any]) -> list[str]:
    """Why the kernel path cannot add these headers as this HCM does (its
    listener's routes then stay with Envoy); [] when it can."""
    out = []
    if bool_field(hcm, "useRemoteAddress", False):
        out.append("http_connection_manager use_remote_address (Envoy appends x-forwarded-for "
                   "and overwrites an external client's x-request-id and x-forwarded-proto)")
    if not bool_field(hcm, "generateRequestId", True):
        out.append("http_connection_manager generate_request_id false (the kernel path adds x-request-id)")
    if internal_clients(hcm):
        out.append("http_connection_manager internal_address_config (requests whose peer "
                   "(use_remote_address) or sole x-forwarded-for address (else; the client "
                   "sends it) is in its ranges are internal: Envoy adds x-envoy-internal and "
                   "honours their x-envoy-* headers, e.g. x-envoy-upstream-rq-timeout-alt-response)")
    if bool_field(hcm, "alwaysSetRequestIdInResponse", False):
        out.append("http_connection_manager always_set_request_id_in_response (response header)")
    ext = (hcm.get("requestIdExtension") or {}).get("typedConfig") or {}
    if ext and ext.get("@type") != UUID_EXTENSION:
        out.append(f"http_connection_manager request_id_extension {ext.get('@type')}")
    return out  # tracing: fastpath.tracing.hcm_reasons


def internal_clients(hcm: dict[str, Any]) -> bool:
    """The HCM (proto JSON) has an internal_address_config that names some
    clients (CIDR ranges, or unix sockets): Envoy 1.40 takes no client as
    internal without one. Callers: hcm_reasons, fastpath.residual_outlier
    (such an HCM may honour x-envoy-upstream-rq-timeout-alt-response)."""
    cfg = hcm.get("internalAddressConfig") or {}
    return bool(cfg.get("cidrRanges")) or bool_field(cfg, "unixSockets", False)


def added_headers(headers: tuple[tuple[str, str], ...],
                  trace_sampling: int | None = None) -> tuple[tuple[str, str], ...]:
    """The lines the kernel path (and the client's Envoy) appends after the
    request's headers (lower-case names): x-forwarded-proto when absent, then
    x-request-id when absent, its value UUID4_PATTERN (on a tracing listener,
    `trace_sampling` not None: fastpath.tracing.traced_id_pattern, the
    version digit per id by fastpath.tracing.version_digit)."""
    names = {n.lower() for n, _ in headers}
    out = []
    if XFP not in names:
        out.append((XFP, "http"))
    if XRID not in names:
        out.append((XRID, UUID4_PATTERN if trace_sampling is None else traced_id_pattern(trace_sampling)))
    return tuple(out)


def normalized(name: str, value: str) -> str:
    """A header value for comparing two runs: a fresh UUID v4 x-request-id
    becomes "<uuid4>" (its value is random either way), any other value stays."""
    return "<uuid4>" if name.lower() == XRID and UUID4.fullmatch(value) else value
