"""KernelPlan -> tables of the data path's built-in decision (dp_decide_inline.h).

Owner: K2. Used by `fastpath.agent_node` when the plan's own l7fp_decide
(fastpath.synth, K1) is not available. The built-in decision only knows path
prefixes of GET requests without a body, so the translation is conservative:
a listener is offered to the kernel only when it has one virtual host and no
RBAC, and each route becomes FORWARD (one cluster, one healthy endpoint, no
rewrite/header/fault/rate-limit), REPLY (direct_response) or a punt entry
(first match wins, DESIGN.md rule 1). Everything else stays with Envoy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from fastpath.loader import IROUTES, K_FORWARD, K_PASS, K_REPLY
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


@dataclass(frozen=True)
class InlineRoute:
    kind: int
    prefix: str
    name: str
    cluster: str = ""
    endpoint: tuple[str, int] | None = None
    reply: bytes = b""
    status: int = 0


@dataclass
class InlineTables:
    """What one plan generation puts into the inline maps."""

    services: dict[tuple[str, int], int] = field(default_factory=dict)  # (ip, port) -> listener
    routes: list[InlineRoute] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # listener -> why not offered


def envoy_reply(status: int, body: str) -> bytes:
    """A direct_response as Envoy writes it (without its date/server headers)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    data = body.encode()
    head = f"HTTP/1.1 {status} {phrase}\r\ncontent-length: {len(data)}\r\n"
    if data:
        head += "content-type: text/plain\r\n"
    return head.encode() + b"\r\n" + data


def _route_entry(plan: KernelPlan, r: Route, inbound_ok: Callable[[str, int], bool]
                 ) -> InlineRoute:
    m = r.match
    simple = (m.path_kind is PathKind.PREFIX and m.case_sensitive and not m.headers
              and not m.query_params and m.method in (None, "GET") and not m.grpc
              and len(m.path.encode()) <= 32 and r.verdict is Verdict.KERNEL
              and not r.request_headers_to_add and not r.request_headers_to_remove
              and r.fault_abort is None and r.rate_limit is None)
    punt = InlineRoute(K_PASS, m.path, r.name)
    if not simple:
        return punt
    a = r.action
    if isinstance(a, DirectResponse):
        return InlineRoute(K_REPLY, m.path, r.name, reply=envoy_reply(a.status, a.body),
                           status=a.status)
    if not isinstance(a, ClusterAction) or len(a.clusters) != 1 or a.prefix_rewrite or \
            a.host_rewrite or a.cluster_header:
        return punt
    c = plan.cluster(a.clusters[0].name)
    if c is None or c.verdict is not Verdict.KERNEL or c.tls:
        return punt
    healthy = [e for e in c.endpoints if e.healthy]
    if len(healthy) != 1 or not inbound_ok(healthy[0].address, healthy[0].port):
        return punt
    return InlineRoute(K_FORWARD, m.path, r.name, cluster=c.name,
                       endpoint=(healthy[0].address, healthy[0].port))


def translate(plan: KernelPlan, vips: Callable[[ListenerPlan], list[tuple[str, int]]],
              inbound_ok: Callable[[str, int], bool]) -> InlineTables:
    """The inline tables of `plan`. `vips(listener)` gives the destinations a
    client dials for that listener; `inbound_ok(ip, port)` says whether the
    destination pod's inbound policy lets the kernel bypass its sidecar."""
    out = InlineTables()
    for lst in plan.listeners:
        if lst.direction is not Direction.OUTBOUND:
            continue
        if lst.verdict is not Verdict.KERNEL or lst.rbac is not None or \
                lst.local_rate_limit is not None or len(lst.virtual_hosts) != 1:
            out.reasons[lst.name] = "listener needs Envoy for the built-in decision"
            continue
        if out.routes:
            out.reasons[lst.name] = "built-in decision holds one listener's routes"
            continue
        vh = lst.virtual_hosts[0]
        if vh.request_headers_to_add or vh.request_headers_to_remove:
            out.reasons[lst.name] = "virtual host adds headers"
            continue
        routes = [_route_entry(plan, r, inbound_ok) for r in vh.routes[:IROUTES]]
        if all(r.kind == K_PASS for r in routes):
            out.reasons[lst.name] = "no route the built-in decision can serve"
            continue  # tracking its connections would only cost
        out.routes = routes
        for dst in vips(lst):
            out.services[dst] = 1
    return out
