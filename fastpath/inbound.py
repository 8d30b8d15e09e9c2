"""May the fast path skip a destination's inbound sidecar? (DESIGN.md rule 4)

The data path delivers a request straight into the destination app, so the
destination's inbound Envoy never sees it. That is only equal to Envoy alone
when the inbound listener would have forwarded every request unchanged to the
app: no RBAC, no rate limit, no fault, no header change, no rewrite, no route
that needs Envoy, and a catch-all route so no request would have got a 404.
Anything else needs the destination's inbound listener decided too.

Called by `fastpath.inbound_merge.merge` for each destination a client's
kernel clusters reach: a transparent inbound side needs no second decision;
any other is merged into the client's plan (the kernel decides it) or keeps
that destination on Envoy. Also the whole rule for the `inline` decision,
which has no second decision. Pure function of the plan.
"""

from __future__ import annotations

from fastpath.plan import ClusterAction, Direction, ListenerPlan, PathKind, Route, Verdict


def inbound_transparent(listeners: tuple[ListenerPlan, ...], port: int) -> bool:
    """True when the inbound listener(s) for `port` forward every request unchanged.

    A port with no inbound listener in the plan has nothing to enforce: the
    sidecar passes such traffic through (Istio's InboundPassthroughCluster), or
    the pod has no sidecar at all.
    """
    inbound = [lp for lp in listeners if lp.direction is Direction.INBOUND and lp.port == port]
    return all(_listener_transparent(lp) for lp in inbound)


def _listener_transparent(lp: ListenerPlan) -> bool:
    if lp.verdict is not Verdict.KERNEL:
        return False
    if lp.rbac is not None or lp.rbacs or lp.local_rate_limit is not None or lp.fault_abort is not None:
        return False
    if lp.trace_sampling is not None:
        return False  # its Envoy samples ids again, removes a header: inbound_merge.trace_refusal
    if len(lp.virtual_hosts) != 1 or lp.virtual_hosts[0].domains != ("*",):
        return False
    vh = lp.virtual_hosts[0]
    if vh.request_headers_to_add or vh.request_headers_to_remove:
        return False
    targets = {_forward_target(r) for r in vh.routes}
    return len(targets) == 1 and None not in targets and any(_catch_all(r) for r in vh.routes)


def _forward_target(r: Route) -> str | None:
    """The one cluster an unchanged forward goes to, or None for anything else."""
    a = r.action
    if (r.verdict is not Verdict.KERNEL or r.fault_abort is not None or r.rate_limit is not None
            or r.request_headers_to_add or r.request_headers_to_remove
            or not isinstance(a, ClusterAction) or len(a.clusters) != 1
            or a.prefix_rewrite is not None or a.host_rewrite is not None or a.timeout_ms
            or a.path_rewrite is not None):
        return None
    return a.clusters[0].name


def _catch_all(r: Route) -> bool:
    m = r.match
    return (m.path_kind is PathKind.PREFIX and m.path == "/" and not m.headers
            and not m.query_params and m.method is None and not m.grpc)
