"""KernelPlan -> tables of the data path's built-in decision (dp_decide_inline.h).

Owner: K2. Used by `fastpath.agent_node` when the plan's own l7fp_decide
(fastpath.synth, K1) is not available. The built-in decision knows exact Host
virtual hosts (plus "*") and path prefixes of GET requests without a body, so
the translation is conservative: a listener is offered to the kernel only
without RBAC, rate limit or wildcard-pattern domains, and each route becomes
FORWARD (one cluster, 1-4 healthy endpoints chosen at random, no
rewrite/header/fault/rate-limit), REPLY (direct_response) or a punt entry
(first match wins, DESIGN.md rule 1). Everything else stays with Envoy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fastpath.loader import IPOOLS, IROUTE_TOTAL, IROUTES, K_FORWARD, K_PASS, K_REPLY
from fastpath.plan import (
    ClusterAction,
    Direction,
    DirectResponse,
    KernelPlan,
    ListenerPlan,
    PathKind,
    Route,
    Verdict,
)
from fastpath.synth import reply_bytes  # the same bytes as l7fp_decide's replies


@dataclass(frozen=True)
class InlineRoute:
    kind: int
    prefix: str
    name: str
    cluster: str = ""
    endpoints: tuple[tuple[str, int], ...] = ()
    reply: bytes = b""
    status: int = 0


@dataclass(frozen=True)
class InlineVhost:
    listener: int
    host: str | None  # None: the "*" entry
    base: int
    count: int


@dataclass
class InlineTables:
    """What one plan generation puts into the inline maps."""

    services: dict[tuple[str, int], int] = field(default_factory=dict)  # (ip, port) -> listener
    routes: list[InlineRoute] = field(default_factory=list)
    vhosts: list[InlineVhost] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # listener -> why not offered


def _route_entry(plan: KernelPlan, r: Route, inbound_ok: Callable[[str, int], bool]
                 ) -> InlineRoute:
    m = r.match
    simple = (m.path_kind is PathKind.PREFIX and m.case_sensitive and not m.headers
              and not m.query_params and m.method in (None, "GET") and not m.grpc
              and len(m.path.encode()) <= 32 and r.verdict is Verdict.KERNEL
              and not r.request_headers_to_add and not r.request_headers_to_remove
              and r.fault_abort is None and r.rate_limit is None
              and r.fault_delay is None)  # delays: only with l7fp_decide (agent_delay.py)
    punt = InlineRoute(K_PASS, m.path, r.name)
    if not simple:
        return punt
    a = r.action
    if isinstance(a, DirectResponse):
        return InlineRoute(K_REPLY, m.path, r.name, reply=reply_bytes(a.status, a.body),
                           status=a.status)
    if not isinstance(a, ClusterAction) or len(a.clusters) != 1 or a.prefix_rewrite or \
            a.path_rewrite or a.host_rewrite or a.cluster_header or a.timeout_ms or a.retry is not None or a.mirrors:
        return punt  # timeouts, retries, mirrors: only with l7fp_decide (timeouts.py, agent_retry.py,
        # agent_mirror.py)
    c = plan.cluster(a.clusters[0].name)
    if c is None or c.verdict is not Verdict.KERNEL or c.tls or c.outlier is not None:
        return punt  # outlier detection: only with l7fp_decide (agent_outlier.py)
    healthy = [e for e in c.endpoints if e.healthy]
    if not 0 < len(healthy) <= IPOOLS or len({e.weight for e in healthy}) != 1:
        return punt  # random choice among equal endpoints only
    if c.lb_policy.value not in ("round_robin", "random", "least_request"):
        return punt  # hashing policies pin requests to endpoints: Envoy
    if not all(inbound_ok(e.address, e.port) for e in healthy):
        return punt
    return InlineRoute(K_FORWARD, m.path, r.name, cluster=c.name,
                       endpoints=tuple((e.address, e.port) for e in healthy))


def _listener(plan: KernelPlan, lst: ListenerPlan, lid: int, base: int,
              inbound_ok: Callable[[str, int], bool]
              ) -> tuple[list[InlineRoute], list[InlineVhost]] | str:
    """Routes and virtual hosts of one listener, or why it stays with Envoy."""
    if lst.verdict is not Verdict.KERNEL or lst.rbac is not None or \
            lst.local_rate_limit is not None:
        return "listener needs Envoy (verdict, RBAC or rate limit)"
    if lst.path_normalization.normalize_path or lst.path_normalization.merge_slashes:
        return "path normalization"
    routes: list[InlineRoute] = []
    vhosts: list[InlineVhost] = []
    seen: set[str | None] = set()
    for vh in lst.virtual_hosts:
        if vh.request_headers_to_add or vh.request_headers_to_remove:
            return f"virtual host {vh.name} changes headers"
        if any(d != "*" and ("*" in d) for d in vh.domains):
            return f"virtual host {vh.name} has wildcard domains"
        entries = [_route_entry(plan, r, inbound_ok) for r in vh.routes[:IROUTES]]
        entries = [e if e.name else replace(e, name=f"{vh.name}#{i}")
                   for i, e in enumerate(entries)]
        start = base + len(routes)
        routes += entries
        for d in vh.domains:
            host = None if d == "*" else d.lower()
            if host in seen:
                continue
            seen.add(host)
            vhosts.append(InlineVhost(lid, host, start, len(entries)))
    if not any(r.kind != K_PASS for r in routes):
        return "no route the built-in decision can serve"  # tracking would only cost
    return routes, vhosts


def translate(plan: KernelPlan, vips: Callable[[ListenerPlan], list[tuple[str, int]]],
              inbound_ok: Callable[[str, int], bool]) -> InlineTables:
    """The inline tables of `plan`. `vips(listener)` gives the destinations a
    client dials for that listener; `inbound_ok(ip, port)` says whether the
    destination pod's inbound policy lets the kernel bypass its sidecar."""
    out = InlineTables()
    lid = 0
    for lst in plan.listeners:
        if lst.direction is not Direction.OUTBOUND:
            continue
        got = _listener(plan, lst, lid + 1, len(out.routes), inbound_ok)
        if isinstance(got, str):
            out.reasons[lst.name] = got
            continue
        routes, vhosts = got
        if len(out.routes) + len(routes) > IROUTE_TOTAL:
            out.reasons[lst.name] = f"built-in decision holds {IROUTE_TOTAL} route entries"
            continue
        lid += 1
        out.routes += routes
        out.vhosts += vhosts
        for dst in vips(lst):
            out.services[dst] = lid
    return out
