"""The residual: the Envoy configuration that stays with the sidecar.

Called by `fastpath.split.split_snapshot`; owned by the split.

Rule 2 of DESIGN.md §4: the kernel may hand Envoy *any* request, so the residual
keeps every route, cluster and filter: Envoy alone still serves everything
correctly. The only thing removed is stateful policy whose owner is the kernel
(rule 3, one owner per bucket):

* a route whose verdict is KERNEL and that carries a local rate limit: the
  kernel owns that bucket; the route's ``local_ratelimit`` per-filter config is
  replaced by a disabled FilterConfig, so Envoy doesn't count the same requests
  a second time;
* a listener whose whole local rate-limit bucket is owned by the kernel (every
  route KERNEL): the HCM's local_ratelimit filter is removed.

Only *outbound* listeners: the kernel evaluates them on the client's own
socket, so it sees every request of that sidecar's bucket. An inbound
listener's bucket is one per destination pod, shared by all its clients,
and the kernel of one client never sees the requests of the others (nor of
connections handed to Envoy): Envoy stays its owner (the fast path hands
such requests to Envoy, see fastpath/inbound_merge.py). Before this rule the
destination's limiter was removed while no kernel enforced it: an inbound
rate limit was not enforced at all with the fast path on.

The same holds for outlier detection (fastpath.residual_outlier): a KERNEL
cluster's detector is the kernel's; Envoy's is removed and Envoy's responses
are sent to it over a gRPC access log.

Requests the kernel hands to Envoy on such a route (parse limit, empty pool) are
charged to the kernel's bucket before being handed over, so the limit is never
doubled (docs/split.md, "Owner rule").

That residual is right only while the kernel runs the plan's buckets: the
server serves it only when the fast-path agent owns the node's limiters, and
otherwise the residual with ``kernel_owns_limits=False`` (every limiter kept;
docs/contracts.md, "Limiter ownership").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastpath import envoy_model as em
from fastpath import residual_outlier
from fastpath.plan import Direction, KernelPlan, ListenerPlan, Verdict

_DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


def residual(resources: Mapping[str, Sequence[Any]], plan: KernelPlan,
             kernel_owns_limits: bool = True) -> dict[str, list[Any]]:
    """``resources`` minus the rate limiters the kernel owns (messages are new copies).

    ``kernel_owns_limits`` False (the agent does not run this node's plan with
    its buckets): nothing is removed, Envoy keeps every limiter."""
    out = {k: list(v) for k, v in resources.items()}
    if not kernel_owns_limits:
        return out
    residual_outlier.apply(out, plan)  # the kernel's outlier detectors: Envoy's off, ALS on
    owned_routes = _kernel_limited_routes(plan)
    owned_listeners = {lp.name.split("#")[0] for lp in plan.listeners
                       if lp.local_rate_limit and lp.verdict is Verdict.KERNEL
                       and lp.direction is Direction.OUTBOUND}
    if owned_routes:
        limiters: set[str] = set()
        for m in out.get(em.LISTENER, []):
            for chain in em.to_json(m).get("filterChains", []):
                for f in chain.get("filters", []):
                    limiters |= _limiter_names(f.get("typedConfig", {}))
        out[em.ROUTE] = [_strip_routes(m, owned_routes, limiters) for m in out.get(em.ROUTE, [])]
    if owned_routes or owned_listeners:
        out[em.LISTENER] = [_strip_listener(m, owned_listeners, owned_routes)
                            for m in out.get(em.LISTENER, [])]
    return out


def _kernel_limited_routes(plan: KernelPlan) -> set[tuple[str, str, int]]:
    """(route config, virtual host, route index) of KERNEL routes with a limiter."""
    owned = set()
    for lp in plan.listeners:
        if lp.direction is Direction.OUTBOUND:
            owned |= _owned_in(lp)
    return owned


def _owned_in(lp: ListenerPlan) -> set[tuple[str, str, int]]:
    return {(lp.route_config, vh.name, i) for vh in lp.virtual_hosts
            for i, r in enumerate(vh.routes) if r.rate_limit and r.verdict is Verdict.KERNEL}


def _limiter_names(hcm: dict[str, Any]) -> set[str]:
    return {str(f.get("name")) for f in hcm.get("httpFilters", [])
            if "local_ratelimit" in str(f.get("typedConfig", {}).get("@type", ""))}


def _strip_rc(rc: dict[str, Any], rc_name: str, owned: set[tuple[str, str, int]],
              limiters: set[str]) -> bool:
    """Disable every local_ratelimit filter on the kernel-owned routes of ``rc``.

    Set on the route itself, so it also overrides a vhost/route-config level limiter.
    """
    changed = False
    for vh in rc.get("virtualHosts", []):
        for i, r in enumerate(vh.get("routes", [])):
            if (rc_name, vh.get("name", ""), i) not in owned:
                continue
            tpfc = r.setdefault("typedPerFilterConfig", {})
            for name in limiters:
                tpfc[name] = dict(_DISABLED)
                changed = True
    return changed


def _strip_routes(msg: Any, owned: set[tuple[str, str, int]], limiters: set[str]) -> Any:
    rc = em.to_json(msg)
    return em.from_json(em.ROUTE, rc) if _strip_rc(rc, str(rc.get("name", "")), owned, limiters) else msg


def _strip_listener(msg: Any, owned_listeners: set[str], owned_routes: set[tuple[str, str, int]]
                    ) -> Any:
    lis = em.to_json(msg)
    changed = False
    for chain in lis.get("filterChains", []):
        for f in chain.get("filters", []):
            hcm = f.get("typedConfig", {})
            if em.type_name(hcm.get("@type", "")) != em.HCM:
                continue
            if "routeConfig" in hcm:
                rc = hcm["routeConfig"]
                changed |= _strip_rc(rc, str(rc.get("name", "")), owned_routes, _limiter_names(hcm))
            if lis.get("name") in owned_listeners:
                before = len(hcm.get("httpFilters", []))
                hcm["httpFilters"] = [x for x in hcm.get("httpFilters", [])
                                      if "local_ratelimit" not in str(x.get("typedConfig", {}).get("@type", ""))]
                changed |= len(hcm["httpFilters"]) != before
    return em.from_json(em.LISTENER, lis) if changed else msg
