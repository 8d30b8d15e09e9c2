"""The destinations' inbound listeners, merged into a client node's plan.

The fast path delivers a request straight into the destination app, past the
destination's inbound sidecar (DESIGN.md rule 4). So the client's datapath
decides twice: with its own outbound listener (which cluster and endpoint),
then with the inbound listener of the pod it picked (RBAC 403, fault abort,
direct response, 404, header adds), as that pod's sidecar would. To have both
in one set of tables, the inbound listeners of the pods the client's kernel
clusters reach are added to the client's KernelPlan under names of their own
(`merged_name`), with their clusters renamed too (never pooled: only the
outbound decision chooses where a request goes).

Called by `fastpath.agent.Agent` before it synthesizes a node's plan; read by
`fastpath.agent_synth.program` (dp_ep_in: endpoint -> inbound listener id).
Pure functions of the plans.

A destination endpoint is offloaded when its inbound side for that port is
transparent (`fastpath.inbound.inbound_transparent`: nothing to decide) or
its one inbound listener could be merged. It is not (its requests go to
Envoy, which runs both sidecars) when:

* the destination pod's plan is unknown, or several inbound listeners match;
* the inbound listener needs Envoy as a whole (verdict, RBAC Envoy must do);
* it has a local rate limit on the listener: that bucket is one per
  destination pod for all its clients and Envoy owns it (fastpath.residual);
  a route's own limit makes that route a punt (its requests go to Envoy),
  as do a route's own timeout, request mirror or path rewrite (the data path
  applies those of the outbound route only);
* it reads or writes a header the outbound side may add (the kernel matches
  the request as the client sent it, the inbound sidecar would see the added
  headers), or a header the client's Envoy adds itself (x-request-id, ...),
  or, when the client has a path rewrite route, `x-envoy-original-path` or
  `:path` as a header (the kernel decides the rewritten path only as the path);
* it has HCM tracing and a client route reaching it is not on an OUTBOUND
  tracing listener with the same tracer and a sampling decision it keeps, or adds
  x-envoy-decorator-operation and also reaches a destination that keeps it
  (`trace_refusal`; otherwise that line is dropped from the client's route).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpath import tracing
from fastpath.inbound import inbound_transparent
from fastpath.plan import (
    ClusterAction,
    Direction,
    HeaderMatch,
    HeaderValue,
    KernelPlan,
    ListenerPlan,
    Route,
    Verdict,
    VirtualHost,
)
from fastpath.rewrite import ORIGINAL_PATH

# Request headers a client's Envoy adds on its way to the destination: the
# inbound sidecar sees them on the slow path, the kernel never.
ENVOY_ADDED = ("x-request-id", "x-forwarded-proto", "x-forwarded-for", "x-forwarded-client-cert")
_MARK = "@inbound:"
NO_PLAN = "destination pod has no known plan"
# an endpoint of a KERNEL cluster that no KERNEL outbound route sends to (a
# sidecar's own inbound cluster, 127.0.0.1:port): no pool, and nothing to say
NOT_ROUTED = "no KERNEL outbound route sends requests here"


def merged_name(ip: str, port: int) -> str:
    """Name of the inbound listener of the pod at ip:port in a merged plan."""
    return f"virtualInbound{_MARK}{ip}:{port}"


def has_merged(plan: KernelPlan) -> bool:
    """The plan holds a destination's inbound listener: the data path must be
    compiled with its second decision (-DDP_INBOUND=1, fastpath.agent._cflags)."""
    return any(_MARK in lp.name for lp in plan.listeners)


def is_merged_cluster(name: str) -> bool:
    """A destination's inbound cluster copied into a merged plan (never pooled)."""
    return _MARK in name


@dataclass
class Merged:
    """The merged plan and, per destination endpoint, why it is not offloaded."""

    plan: KernelPlan
    merged: dict[tuple[str, int], str] = field(default_factory=dict)  # -> listener name
    versions: dict[tuple[str, int], str] = field(default_factory=dict)  # -> its plan's version
    refused: dict[tuple[str, int], str] = field(default_factory=dict)  # -> reason

    def offloadable(self, ip: str, port: int) -> bool:
        return (ip, port) not in self.refused


def merge(plan: KernelPlan, plan_of_ip: Callable[[str], KernelPlan | None]) -> Merged:
    """`plan` plus the inbound listeners of the endpoints its kernel clusters reach.

    `plan_of_ip(ip)` is the plan of the pod with that address, or None."""
    added = _outbound_added_names(plan)
    reach = Reach.of(plan)
    listeners: list[ListenerPlan] = []
    clusters: dict[str, Any] = {}
    out = Merged(plan)
    for (ip, port), routes in reach.routes.items():
        if not routes:
            out.refused[(ip, port)] = NOT_ROUTED
            continue
        dest = plan_of_ip(ip)
        if dest is None:
            out.refused[(ip, port)] = NO_PLAN
            continue
        if inbound_transparent(dest.listeners, port):
            continue
        lp, why = _mergeable(dest, port, added)
        why = why or (trace_refusal(lp, reach, (ip, port), plan_of_ip) if lp is not None else "")
        lp = None if why else lp
        if lp is None:
            out.refused[(ip, port)] = why
            continue
        copy, own = _renamed(lp, dest, ip, port)
        listeners.append(copy)
        clusters.update({c.name: c for c in own})
        out.merged[(ip, port)] = copy.name
        out.versions[(ip, port)] = dest.version
    mine = _without_stripped_headers(plan, reach, out, plan_of_ip)
    stripped = mine != plan.listeners
    if listeners or stripped:
        tag = hashlib.sha256(repr((listeners, mine) if stripped else listeners).encode()
                             ).hexdigest()[:8]
        out.plan = dataclasses.replace(
            plan, version=f"{plan.version}+in{tag}",
            listeners=(*mine, *listeners), clusters=(*plan.clusters, *clusters.values()))
    return out


EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
DECORATOR = "x-envoy-decorator-operation"


def _strips(dest: KernelPlan | None, port: int) -> bool:
    """The destination's inbound sidecar deems a request from a client sidecar
    external and strips x-envoy-* control headers (Envoy's
    ConnectionManagerUtility::mutateRequestHeaders: use_remote_address off and
    no x-forwarded-for, as the client's sidecar without use_remote_address
    sends it). Seen in tests/kernel_retry: the app never gets the header."""
    lp = _inbound_listener(dest, port)
    return lp is not None and not lp.use_remote_address


def _traces(dest: KernelPlan | None, port: int) -> bool:
    """The destination's one inbound listener for `port` has HCM tracing: its
    Envoy (not OUTBOUND) takes x-envoy-decorator-operation off the request
    (the operation of its span; seen in tests/split/test_tracing_inbound_envoy.py)."""
    lp = _inbound_listener(dest, port)
    return lp is not None and lp.trace_sampling is not None


def _inbound_listener(dest: KernelPlan | None, port: int) -> ListenerPlan | None:
    """The destination's inbound listener for `port`, None unless exactly one."""
    found = [lp for lp in (dest.listeners if dest else ()) if lp.direction is Direction.INBOUND
             and lp.port == port]
    return found[0] if len(found) == 1 else None


# header -> does the destination's inbound sidecar take it off the request
_INBOUND_REMOVES: dict[str, Callable[[KernelPlan | None, int], bool]] = {
    EXPECTED_TIMEOUT: _strips, DECORATOR: _traces}


def _without_stripped_headers(plan: KernelPlan, reach: Reach, out: Merged,
                              plan_of_ip: Callable[[str], KernelPlan | None]
                              ) -> tuple[ListenerPlan, ...]:
    """The client's listeners, with the kernel's insert of a header the
    inbound sidecar removes (x-envoy-expected-rq-timeout-ms: `_strips`,
    x-envoy-decorator-operation: `_traces`) dropped from outbound routes
    whose every offloaded endpoint's inbound sidecar removes it: the kernel
    delivers past that sidecar, so the app must not get what the sidecar
    would remove (a route that reaches both kinds keeps it, and
    `trace_refusal` refuses the tracing ones). A route's endpoints are the
    kernel's (`Reach.route_endpoints`), as trace_refusal sees them."""
    def stripped(r: Route, name: str) -> bool:
        if not any(h.name.lower() == name for h in r.request_headers_to_add):
            return False
        offloaded = [ep for ep in reach.route_endpoints(r) if out.offloadable(*ep)]
        removes = _INBOUND_REMOVES[name]
        return bool(offloaded) and all(removes(plan_of_ip(ip), port) for ip, port in offloaded)

    def route(r: Route) -> Route:
        gone = {name for name in _INBOUND_REMOVES if stripped(r, name)}
        if not gone:
            return r
        adds = tuple(h for h in r.request_headers_to_add if h.name.lower() not in gone)
        return dataclasses.replace(r, request_headers_to_add=adds)

    return tuple(lp if lp.direction is not Direction.OUTBOUND or lp.use_remote_address else
                 dataclasses.replace(lp, virtual_hosts=tuple(
                     dataclasses.replace(vh, routes=tuple(route(r) for r in vh.routes))
                     for vh in lp.virtual_hosts))
                 for lp in plan.listeners)


def kernel_endpoints(plan: KernelPlan) -> dict[str, list[tuple[str, int]]]:
    """Per cluster the kernel may pool (KERNEL, no TLS, not a merged copy),
    its endpoints: the destinations `merge` decides (fastpath.inbound_verdict too)."""
    return {c.name: [(e.address, e.port) for e in c.endpoints] for c in plan.clusters
            if c.verdict is Verdict.KERNEL and not c.tls and not is_merged_cluster(c.name)}


@dataclass(frozen=True)
class Reach:
    """Where a client plan's kernel may send requests, built once per `merge`:
    `eps` (kernel_endpoints) and, per endpoint (in the clusters' order), the
    KERNEL routes of its OUTBOUND KERNEL listeners that may send one there."""

    eps: dict[str, list[tuple[str, int]]]
    routes: dict[tuple[str, int], list[tuple[ListenerPlan, Route]]]

    @classmethod
    def of(cls, plan: KernelPlan) -> Reach:
        eps = kernel_endpoints(plan)
        routes: dict[tuple[str, int], list[tuple[ListenerPlan, Route]]] = {
            ep: [] for ep_list in eps.values() for ep in ep_list}
        for lp in plan.listeners:
            if lp.direction is not Direction.OUTBOUND or lp.verdict is not Verdict.KERNEL:
                continue
            for vh in lp.virtual_hosts:
                for r in vh.routes:
                    if r.verdict is Verdict.KERNEL:
                        for ep in dict.fromkeys(_route_endpoints(eps, r)):
                            routes[ep].append((lp, r))
        return cls(eps, routes)

    def route_endpoints(self, r: Route) -> list[tuple[str, int]]:
        return _route_endpoints(self.eps, r)


def _route_endpoints(eps: dict[str, list[tuple[str, int]]], r: Route) -> list[tuple[str, int]]:
    """The endpoints the kernel may send a request of `r` to (`eps`:
    kernel_endpoints): one answer for trace_refusal and the stripped headers."""
    a = r.action
    if not isinstance(a, ClusterAction):
        return []
    return [ep for wc in a.clusters for ep in eps.get(wc.name, [])]


def _mergeable(dest: KernelPlan, port: int, added: set[str]) -> tuple[ListenerPlan | None, str]:
    found = [lp for lp in dest.listeners if lp.direction is Direction.INBOUND and lp.port == port]
    if len(found) != 1:
        return None, f"{len(found)} inbound listeners for port {port}"
    lp = found[0]
    why = listener_refusal(lp)
    if why:
        return None, why
    clash = sorted(header_names(lp) & added)
    if clash:
        return None, f"inbound policy reads a header the outbound side adds: {', '.join(clash)}"
    return lp, ""


def trace_refusal(lp: ListenerPlan, reach: Reach, ep: tuple[str, int],
                  plan_of_ip: Callable[[str], KernelPlan | None]) -> str:
    """Why the client whose `reach` this is may not merge the destination's
    inbound listener `lp` at endpoint `ep` because of lp's HCM tracing (""
    when it may, or without tracing). The rule: every client route reaching
    `ep` is on an OUTBOUND tracing listener with lp's tracer whose sampling
    decision lp keeps (`tracing.inbound_sampling`), and a decorator line it
    adds goes to tracing inbound sides only; why, in docs/split.md "Inbound
    tracing"."""
    if lp.trace_sampling is None:
        return ""
    for out, r in reach.routes.get(ep, []):
        if not out.trace_egress:
            return (f"inbound tracing behind client listener {out.name} that is not an OUTBOUND "
                    "tracing listener (the inbound sidecar samples the id again, its route "
                    "decorator reaches the client)")
        if out.trace_provider != lp.trace_provider:
            return (f"inbound tracing provider {lp.trace_provider or 'none'}, client listener "
                    f"{out.name} {out.trace_provider or 'none'}")
        arrive = tracing.inbound_sampling(out.trace_sampling, lp.trace_sampling, lp.trace_overall)
        if arrive != out.trace_sampling:
            return (f"inbound tracing samples the caller's ids again: {arrive}/10000 arrive "
                    f"sampled, client listener {out.name} samples {out.trace_sampling}/10000")
        if any(h.name.lower() == DECORATOR for h in r.request_headers_to_add) and not all(
                _traces(plan_of_ip(ip), port) for ip, port in reach.route_endpoints(r)):
            return (f"client route {r.name!r} adds {DECORATOR}, which this inbound sidecar "
                    "removes and another destination of the route keeps")
    return ""


def listener_refusal(lp: ListenerPlan) -> str:
    """Why no client may merge the inbound listener `lp`, whoever the client is
    ("" when it may): also read by fastpath.inbound_verdict."""
    if lp.verdict is not Verdict.KERNEL:
        return f"inbound listener needs Envoy: {lp.reason}"
    if any(rb.verdict is not Verdict.KERNEL for rb in (*lp.rbacs, *((lp.rbac,) if lp.rbac else ()))):
        return "inbound RBAC needs Envoy"
    if lp.local_rate_limit is not None:
        return "inbound local rate limit (its bucket is the destination's Envoy's)"
    return ""


def inbound_punt(r: Route) -> str | None:
    """Why the merged copy of the KERNEL inbound route `r` is a punt (its
    requests go to Envoy), None when the kernel decides it: `_renamed`'s rule,
    also read by fastpath.inbound_verdict."""
    if r.verdict is not Verdict.KERNEL:
        return None
    a = r.action
    if r.rate_limit is not None:
        # the bucket is the destination Envoy's (fastpath.residual)
        return "inbound rate limit (Envoy owns the bucket)"
    if isinstance(a, ClusterAction) and a.timeout_ms:
        # the data path times the outbound route only (fastpath/timeouts.py)
        return "inbound route timeout (the kernel times the outbound route only)"
    if _rewrites(r):
        # the data path rewrites by the outbound route only (dp_rewrite.h)
        return "inbound path rewrite (the kernel rewrites by the outbound route only)"
    if isinstance(a, ClusterAction) and a.mirrors:
        # the agent shadows the outbound route's requests only (agent_mirror.py)
        return "inbound request mirror (the destination's Envoy shadows it)"
    return None


def _renamed(lp: ListenerPlan, dest: KernelPlan, ip: str, port: int
             ) -> tuple[ListenerPlan, list[Any]]:
    """A copy of lp under merged names; its clusters copied under names of their own."""
    suffix = f"{_MARK}{ip}:{port}"
    names: set[str] = set()

    def route(r: Route) -> Route:
        a = r.action
        if isinstance(a, ClusterAction):
            names.update(wc.name for wc in a.clusters)
            a = dataclasses.replace(a, clusters=tuple(
                dataclasses.replace(wc, name=wc.name + suffix) for wc in a.clusters))
        punt = inbound_punt(r)
        if punt is not None:
            return dataclasses.replace(r, action=a, verdict=Verdict.ENVOY, reason=punt)
        return dataclasses.replace(r, action=a)

    vhs = tuple(dataclasses.replace(vh, routes=tuple(route(r) for r in vh.routes))
                for vh in lp.virtual_hosts)
    copy = dataclasses.replace(lp, name=merged_name(ip, port), virtual_hosts=vhs,
                               route_config=lp.route_config + suffix)
    own = [dataclasses.replace(c, name=c.name + suffix)
           for c in dest.clusters if c.name in names]
    return copy, own


def _outbound_added_names(plan: KernelPlan) -> set[str]:
    """Headers the client's outbound side may add or change on a forwarded
    request: a path rewrite adds x-envoy-original-path and changes :path (the
    kernel decides the inbound side on the rewritten path, not on headers
    matched by those names)."""
    names = set(ENVOY_ADDED)
    for lp in plan.listeners:
        if lp.direction is Direction.OUTBOUND:
            for vh in lp.virtual_hosts:
                names |= {h.name.lower() for h in vh.request_headers_to_add}
                for r in vh.routes:
                    names |= {h.name.lower() for h in r.request_headers_to_add}
                    if _rewrites(r):
                        names |= {ORIGINAL_PATH, ":path"}
    return names


def _rewrites(r: Route) -> bool:
    a = r.action
    return isinstance(a, ClusterAction) and bool(a.prefix_rewrite or a.path_rewrite)


def header_names(lp: ListenerPlan) -> set[str]:
    """Every request header name the listener matches on, adds or removes."""
    names = {h.name.lower() for h in _walk(lp) if isinstance(h, (HeaderMatch, HeaderValue))}
    for vh in lp.virtual_hosts:
        names |= _removed(vh)
        for r in vh.routes:
            names |= {n.lower() for n in r.request_headers_to_remove}
    return names


def _removed(vh: VirtualHost) -> set[str]:
    return {n.lower() for n in vh.request_headers_to_remove}


def _walk(obj: Any) -> Iterator[Any]:
    """obj and every dataclass / tuple member below it."""
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, tuple):
        for x in obj:
            yield from _walk(x)
