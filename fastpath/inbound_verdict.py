"""Verdicts that know the destinations' inbound side: no KERNEL route whose
every request the data path hands to Envoy.

A node's plan (fastpath.split) is made from that node's resources only: a
client route to a destination whose inbound side keeps the request on Envoy
(DESIGN.md rule 3: the destination's listener-level rate limit; a route-level
one makes the merged inbound route a punt) is KERNEL there, yet every request
of it goes to Envoy (`no_pool`, `punt_route`). Where the destinations' plans
are known (the agent's view of a mesh), `honest_plan` marks such routes ENVOY
with a reason naming the destination and the cause.

No second copy of the runtime rule: what happens to an endpoint comes from
`fastpath.inbound_merge.merge` (the agent's own call: refused endpoints get
no pool) and the merged inbound listener's route verdicts (its punts). Only
whole routes change, conservatively:

* an outbound route becomes ENVOY when every endpoint of every cluster it may
  pick (weight > 0) is refused for a cause of the destination (not "no known
  plan": that is transient), or its merged inbound listener's first route
  that can match any request of the route is a punt matching all of them
  (literal paths compared; a regex DFA, case-insensitive path, header, query
  or gRPC matcher on the inbound side before it counts as "maybe partial"; a
  punt whose kernel entry catches every request, `synth_tables.punt_catches_all`,
  matches all of them);
  a route the kernel itself may answer (its own or its listener's fault
  abort, rate limit, RBAC), that rewrites the path, or whose merged inbound
  listener has listener-level RBAC or abort stays KERNEL;
* an inbound route of a non-transparent inbound listener becomes ENVOY when
  every client kernel must hand it to Envoy: the listener is refused whoever
  merges it (`listener_refusal`), or the route's merged copy is a punt
  (`inbound_punt`), or it has HCM tracing and every caller whose KERNEL
  routes reach it (`Callers`, the agent's view) refuses it (`trace_refusal`);
  with the `inline` decision (no second decision) every route of a
  non-transparent inbound listener.

Called by `fastpath.agent.Agent.plan_view` (`/debug/fastpath/plans`, read by
`l7fp mesh audit`). Pure functions of the plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from fastpath.inbound import inbound_transparent
from fastpath.inbound_merge import (
    NO_PLAN,
    Merged,
    Reach,
    inbound_punt,
    kernel_endpoints,
    listener_refusal,
    merge,
    trace_refusal,
)
from fastpath.plan import (
    ClusterAction,
    Direction,
    KernelPlan,
    ListenerPlan,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
)
from fastpath.synth_punt import disjoint
from fastpath.synth_tables import punt_catches_all, punt_match

PlanOfIp = Callable[[str], KernelPlan | None]
INLINE = "inbound side not transparent (the inline decision has no second decision)"


@dataclass(frozen=True)
class Callers:
    """The plans of the nodes whose kernel may send to the pod at `ip` (the
    agent knows them): their merge decides that pod's tracing inbound side."""

    ip: str
    plans: tuple[KernelPlan, ...]


def honest_plan(plan: KernelPlan, plan_of_ip: PlanOfIp, decide: str = "l7fp",
                inbound_decide: str | None = None, callers: Callers | None = None) -> KernelPlan:
    """`plan` with the routes every request of which goes to Envoy because of
    the destinations' inbound side marked ENVOY (see the module docstring).
    `decide`: the node's decision for its outbound side ("l7fp" merges,
    "inline" does not); `inbound_decide`: its clients' decision, which is the
    one that merges its inbound side (default: `decide`); `callers`: its
    clients' plans, when known (a tracing inbound listener every one of them
    refuses to merge is ENVOY)."""
    merged = merge(plan, plan_of_ip) if decide == "l7fp" else inline_merged(plan, plan_of_ip)
    inbound = decide if inbound_decide is None else inbound_decide
    reaches = [Reach.of(c) for c in callers.plans] if callers is not None else []

    def side(lp: ListenerPlan) -> ListenerPlan:
        if lp.direction is Direction.OUTBOUND:
            return _outbound(lp, plan, merged)
        refused = _trace_refused(lp, callers.ip, reaches, plan_of_ip) if callers else ""
        return _inbound(lp, plan, inbound, refused)

    listeners = tuple(side(lp) for lp in plan.listeners)
    if listeners == plan.listeners:
        return plan
    return dataclasses.replace(plan, listeners=listeners)


def inline_merged(plan: KernelPlan, plan_of_ip: PlanOfIp) -> Merged:
    """The inline decision's view (fastpath.agent._inbound_ok): an endpoint
    whose inbound side is not transparent gets no pool."""
    out = Merged(plan)
    for eps in kernel_endpoints(plan).values():
        for ip, port in eps:
            dest = plan_of_ip(ip)
            if dest is None:
                out.refused[(ip, port)] = NO_PLAN
            elif not inbound_transparent(dest.listeners, port):
                out.refused[(ip, port)] = INLINE
    return out


def _with_routes(lp: ListenerPlan, change: Callable[[Route], str | None]) -> ListenerPlan:
    """lp with each KERNEL route for which `change` gives a reason made ENVOY."""
    def route(r: Route) -> Route:
        why = change(r) if r.verdict is Verdict.KERNEL else None
        return r if why is None else dataclasses.replace(r, verdict=Verdict.ENVOY, reason=why)

    vhs = tuple(dataclasses.replace(vh, routes=tuple(route(r) for r in vh.routes))
                for vh in lp.virtual_hosts)
    return lp if vhs == lp.virtual_hosts else dataclasses.replace(lp, virtual_hosts=vhs)


def _trace_refused(lp: ListenerPlan, ip: str, reaches: list[Reach], plan_of_ip: PlanOfIp) -> str:
    """trace_refusal's reason when every caller whose KERNEL routes reach the
    tracing inbound listener `lp` of the pod at `ip` refuses to merge it ("" when
    one merges it, none reaches it, or without tracing): all its requests go
    through Envoy, though the split alone says KERNEL."""
    if lp.trace_sampling is None:
        return ""
    ep = (ip, lp.port)
    why = [trace_refusal(lp, r, ep, plan_of_ip) for r in reaches if r.routes.get(ep)]
    if not why or not all(why):
        return ""
    return why[0] + (f" (and {len(why) - 1} other caller(s) refuse it)" if len(why) > 1 else "")


def _inbound(lp: ListenerPlan, plan: KernelPlan, decide: str, trace_refused: str = "") -> ListenerPlan:
    if lp.verdict is not Verdict.KERNEL or inbound_transparent(plan.listeners, lp.port):
        return lp
    whole = INLINE if decide != "l7fp" else listener_refusal(lp) or trace_refused

    def why(r: Route) -> str | None:
        cause = whole or inbound_punt(r)
        return f"every client kernel hands it to Envoy: {cause}" if cause else None

    return _with_routes(lp, why)


def _outbound(lp: ListenerPlan, plan: KernelPlan, merged: Merged) -> ListenerPlan:
    if (lp.verdict is not Verdict.KERNEL or lp.local_rate_limit is not None
            or lp.rbac is not None or lp.rbacs or lp.fault_abort is not None):
        return lp  # the kernel itself may answer some requests (429, 403, abort)
    eps = kernel_endpoints(plan)
    return _with_routes(lp, lambda r: _route_cause(r, eps, merged))


def _route_cause(r: Route, eps: dict[str, list[tuple[str, int]]], merged: Merged) -> str | None:
    a = r.action
    if (not isinstance(a, ClusterAction) or r.fault_abort is not None or r.rate_limit is not None
            or a.prefix_rewrite or a.path_rewrite is not None):
        return None
    picked = [wc.name for wc in a.clusters if wc.weight > 0]
    if not picked or any(not eps.get(name) for name in picked):
        return None  # a cluster the kernel does not pool, or without endpoints
    causes: dict[str, str] = {}
    for name in picked:
        for ep in eps[name]:
            cause = _endpoint_cause(r, ep, merged)
            if cause is None:
                return None
            causes.setdefault(f"{destination(name)}: {cause}", "")
    return "destination " + "; ".join(causes)


def destination(cluster: str) -> str:
    """A cluster's service for a reason: Istio's `outbound|80||svc.ns.svc...` -> svc."""
    host = cluster.rsplit("|", 1)[-1]
    return host.split(".", 1)[0] if "|" in cluster else cluster


def _endpoint_cause(r: Route, ep: tuple[str, int], merged: Merged) -> str | None:
    refused = merged.refused.get(ep)
    if refused is not None:
        return None if refused == NO_PLAN else refused
    name = merged.merged.get(ep)
    if name is None:
        return None  # transparent inbound side: the kernel delivers
    lp = next(x for x in merged.plan.listeners if x.name == name)
    return _punts_all(r.match, lp)


def _punts_all(m: RouteMatch, lp: ListenerPlan) -> str | None:
    """The punt reason when the merged inbound listener `lp` hands every
    request matching `m` to Envoy; None when it may decide some itself."""
    if lp.rbac is not None or lp.rbacs or lp.fault_abort is not None:
        return None
    if len(lp.virtual_hosts) != 1 or "*" not in lp.virtual_hosts[0].domains:
        return None  # which virtual host depends on the Host
    for ir in lp.virtual_hosts[0].routes:
        if ir.verdict is Verdict.ENVOY and punt_catches_all(ir):
            return f"inbound route {ir.name!r}: {ir.reason}"  # overlaps and covers every match
        # a punt entry matches by the part of its matcher the kernel evaluates
        im = punt_match(ir.match) if ir.verdict is Verdict.ENVOY else ir.match
        if disjoint(m, im):
            continue
        if ir.verdict is Verdict.ENVOY and _covers(im, m):
            return f"inbound route {ir.name!r}: {ir.reason}"
        return None
    return None


def _covers(outer: RouteMatch, inner: RouteMatch) -> bool:
    """True only when every request matching `inner` matches `outer`."""
    if outer.headers or outer.query_params or outer.grpc:
        return False
    if outer.method is not None and outer.method != inner.method:
        return False
    if outer.path_kind is PathKind.PATH_SEPARATED_PREFIX:
        return False  # its literal_path is a superset of what it matches
    lo, li = outer.literal_path(), inner.literal_path()
    if lo is None or li is None:
        return False
    if lo[0] == "exact":
        return li == lo
    return li[1].startswith(lo[1])
