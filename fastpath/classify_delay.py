"""Envoy's fault filter delay on one route -> plan.FaultDelay, or the reasons it needs Envoy.

Called by `fastpath.classify_route` for every route (and by `fastpath.classify` for
the HCM-level config, which also delays requests without a route); owned by the
split's fault-delay part. The kernel delays a sampled share of a route's requests
by a fixed time before the upstream sees them (bpf_src/dp_delay.h,
fastpath/agent_delay.py). What it does not copy stays ENVOY, named:

* ``header_delay`` (the delay and its percentage come from the request's
  ``x-envoy-fault-delay-request*`` headers; without ``header_delay`` Envoy ignores
  those headers, checked against Envoy 1.40 by tests/kernel_datapath/test_delay.py);
* ``max_active_faults``: a count of delayed requests in flight, owned by Envoy;
* a finite route timeout: Envoy's router starts its timer after the delay, the
  kernel's timer record is armed when the request is decided;
* a direct response or redirect (the router answers them after the delay; the
  kernel's reply cannot wait);
* request mirroring on the route (the router sends the shadow after the delay,
  the kernel's shadow leaves at the decision);
* a local rate limit filter after the fault filter (its tokens are taken after the
  delay in Envoy), an RBAC filter after it (Envoy's 403 comes after the delay, the
  kernel's at once);
* a runtime that can override the percentages (``KernelCaps.fault_runtime``: the
  bootstrap's ``layered_runtime`` has a disk / RTDS / admin layer); this one also
  applies to aborts.
"""

from __future__ import annotations

from typing import Any

from fastpath.envoy_model import ResourceError, duration_ms, type_name
from fastpath.plan import Action, ClusterAction, FaultDelay

Reasons = list[str]


def per_million(p: dict[str, Any]) -> int:
    """FractionalPercent (proto-JSON) -> parts per million (denominator HUNDRED by default)."""
    denom = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}[p.get("denominator", "HUNDRED")]
    return min(1_000_000, int(p.get("numerator", 0)) * (1_000_000 // denom))


def delay_of(cfg: dict[str, Any]) -> tuple[FaultDelay | None, Reasons]:
    """The delay of one HTTPFault config (proto-JSON), with the reasons it needs Envoy.
    None without reasons: no delay can happen (none configured, or 0 %)."""
    delay = cfg.get("delay")
    if not delay:
        return None, []
    if "headerDelay" in delay:
        return None, ["fault delay from request headers (header_delay)"]
    if "fixedDelay" not in delay or "percentage" not in delay:
        return None, ["fault delay without fixed_delay and percentage"]
    try:
        ms = duration_ms(str(delay["fixedDelay"]))
    except (ResourceError, ValueError):
        return None, [f"fault delay {delay['fixedDelay']!r} not a duration"]
    per = per_million(delay["percentage"])
    if per == 0 or not ms:
        return None, []
    reasons = []  # an abort with it: its reply waits for the delay (dp_delay_reply)
    if "maxActiveFaults" in cfg:
        reasons.append("fault filter max_active_faults (Envoy counts active faults)")
    return FaultDelay(int(ms or 0), per), reasons


def _active_configs(filters: list[Any], per_filter: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(position, effective config) of each active fault filter of the chain."""
    out = []
    for i, f in enumerate(filters):
        if f.kind != "fault":
            continue
        override = per_filter.get(f.name)
        if override is None:
            if not f.disabled:
                out.append((i, f.config))
            continue
        if override.get("disabled", False):
            continue
        if type_name(override.get("@type", "")) == "envoy.config.route.v3.FilterConfig":
            out.append((i, override.get("config") or f.config))
        else:
            out.append((i, override))
    return out


def route_delay(filters: list[Any], per_filter: dict[str, Any], action: Action,
                fault_runtime: str = "") -> tuple[FaultDelay | None, Reasons]:
    """The route's fault delay under the HCM's filters (``classify_route.HttpFilter``)
    and the route's per-filter overrides; reasons name what needs Envoy."""
    reasons: Reasons = []
    found: FaultDelay | None = None
    for pos, cfg in _active_configs(filters, per_filter):
        if fault_runtime and (cfg.get("delay") or cfg.get("abort")):
            reasons.append(f"fault percentages may come from the runtime ({fault_runtime})")
        delay, more = delay_of(cfg)
        reasons += more
        if delay is None:
            continue
        if found is not None:
            reasons.append("two fault filters with delays")
        found = delay
        reasons += _route_reasons(filters, pos, action)
    return found, reasons


def _route_reasons(filters: list[Any], pos: int, action: Action) -> Reasons:
    reasons = []
    if not isinstance(action, ClusterAction):
        reasons.append("fault delay before a direct response or redirect")
    else:
        if action.timeout_ms is not None:
            reasons.append(f"route timeout {action.timeout_ms}ms with fault delay "
                           "(Envoy's timer starts after the delay)")
        if getattr(action, "mirrors", ()):
            reasons.append("fault delay with request mirroring (Envoy's router sends the "
                           "shadow after the delay, the kernel's at the decision)")
    if any(f.kind == "local_ratelimit" and not f.disabled for f in filters[pos + 1:]):
        reasons.append("local rate limit after a fault delay (tokens taken after the delay)")
    if any(f.kind == "rbac" and not f.disabled for f in filters[pos + 1:]):
        reasons.append("RBAC after a fault delay (Envoy denies after the delay)")
    return reasons


def listener_delay_reasons(cfg: dict[str, Any]) -> Reasons:
    """The HCM-level fault config also delays requests without a route, which the
    kernel answers 404 at once: a delay there keeps the listener with Envoy."""
    delay, more = delay_of(cfg)
    if delay is None and not more:
        return []
    return ["fault delay for requests without a route (the kernel's 404 is not delayed)"]


def runtime_of(bootstrap: dict[str, Any]) -> str:
    """A description of the bootstrap's runtime layers that can change fault
    percentages at any time ("" when none: defaults come from the config)."""
    lr = bootstrap.get("layered_runtime", bootstrap.get("layeredRuntime")) or {}
    kinds = []
    for layer in lr.get("layers") or []:
        if not isinstance(layer, dict):
            continue
        for key, name in (("disk_layer", "disk_layer"), ("diskLayer", "disk_layer"),
                          ("rtds_layer", "rtds_layer"), ("rtdsLayer", "rtds_layer"),
                          ("admin_layer", "admin_layer"), ("adminLayer", "admin_layer")):
            if key in layer:
                kinds.append(f"{name} {layer.get('name', '')}".strip())
    return "layered_runtime " + ", ".join(kinds) if kinds else ""
