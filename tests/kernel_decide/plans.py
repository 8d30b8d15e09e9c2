"""Plans the kernel decision tests run against (K1 test support)."""

from __future__ import annotations

from fastpath import plan as P

C1 = P.Cluster("c1", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.2", 80),
                                             P.Endpoint("198.18.0.3", 80)))
C2 = P.Cluster("c2", P.LbPolicy.RANDOM, (P.Endpoint("198.18.0.4", 80),))
C0 = P.Cluster("empty", P.LbPolicy.RANDOM, ())


def fwd(*names: str, weights: tuple[int, ...] = ()) -> P.ClusterAction:
    ws = weights or (1,) * len(names)
    return P.ClusterAction(tuple(P.WeightedCluster(n, w) for n, w in zip(names, ws, strict=True)))


def route(name: str, kind: P.PathKind, path: str, action: P.Action, **kw: object) -> P.Route:
    verdict = kw.pop("verdict", P.Verdict.KERNEL)
    headers = kw.pop("headers", ())
    cs = kw.pop("case_sensitive", True)
    m = P.RouteMatch(kind, path, case_sensitive=cs, headers=headers)  # type: ignore[arg-type]
    return P.Route(name, m, action, verdict, **kw)  # type: ignore[arg-type]


def parser_plan() -> P.KernelPlan:
    """One listener: host "web" (and "web:80"); /api forwards, /deny replies 403,
    /slow is a punt entry, everything else forwards to c2."""
    vh = P.VirtualHost("web", ("web", "web:80", "*.web.example"), routes=(
        route("api", P.PathKind.PREFIX, "/api", fwd("c1")),
        route("deny", P.PathKind.EXACT, "/deny", P.DirectResponse(403, "denied\n")),
        route("slow", P.PathKind.PREFIX, "/slow", fwd("c1"), verdict=P.Verdict.ENVOY,
              reason="retry_policy"),
        route("empty", P.PathKind.PREFIX, "/empty", fwd("empty")),
        route("rest", P.PathKind.PREFIX, "/", fwd("c2")),
    ))
    lp = P.ListenerPlan("out", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    return P.KernelPlan("node", "1", listeners=(lp,), clusters=(C1, C2, C0))
