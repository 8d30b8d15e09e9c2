"""What a punt entry matches: the part of a route's matcher the kernel evaluates.

A route the kernel does not execute (ENVOY, or one the synthesis cannot
build) stays in the kernel's table as a punt entry, so that a request it may
match goes to Envoy and never falls through to a later kernel route (DESIGN.md
rule 1). A route's matcher is a conjunction (path AND method AND every header
AND every query parameter): a request that fails one conjunct cannot match
the route, whatever the others say. So the punt entry keeps every conjunct
the kernel evaluates exactly as Envoy does and leaves the others out; it
punts every request the route may match, and lets the others go on to later
routes. Left out: a conjunct `fastpath.classify_match` marked not
`evaluable` (e.g. a hop-by-hop header, treat_missing_header_as_empty), one the
synthesis cannot build (`:authority`/`:path`, a regex without a small DFA, a
name or value over the caps, a query matcher kind the kernel lacks), the gRPC
matcher, and the conjuncts over the per-route caps (4 header, 2 query
matchers: the first ones are kept).

Owned by the synthesis (K1). Called by `fastpath.synth_tables.TableBuilder`
(the punt rows), `fastpath.reference` (the model stops at a punt where the
kernel does) and `fastpath.inbound_verdict`. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fastpath.plan import PathKind, RouteMatch
from fastpath.synth import MAX_HMATCH_CAP, Punt

MAX_QMATCH = 2  # cap of query-parameter matchers per route (L7FP_MAX_QMATCH)
CATCH_ALL = RouteMatch(PathKind.PREFIX, "")


def kernel_part(tb: Any, m: RouteMatch) -> RouteMatch:
    """The conjuncts of `m` that the TableBuilder `tb` builds (each tried on
    its own: a trial may take a header slot, as the full build would)."""
    path = dataclasses.replace(m, headers=(), query_params=(), method=None, grpc=False)
    if not _builds(tb._match, path):
        path = CATCH_ALL
    headers, method = [], None
    for h in m.headers:
        if h.name == ":method":
            if method is None and h.evaluable and _builds(tb._method, h, {}):
                headers.append(h)
                method = h.match.value if h.match else None
        elif (h.evaluable and sum(x.name != ":method" for x in headers) < MAX_HMATCH_CAP
              and _builds(tb._hmatch, h)):
            headers.append(h)
    queries = [q for q in m.query_params if q.evaluable and _builds(tb._qmatch, q)][:MAX_QMATCH]
    return dataclasses.replace(path, headers=tuple(headers), query_params=tuple(queries),
                               method=method)


def is_exact(kernel: RouteMatch, m: RouteMatch) -> bool:
    """The punt entry whose kernel matcher is `kernel` (kernel_part of `m`)
    matches exactly the requests Envoy's route with matcher `m` matches:
    nothing was left out, and `m` has no part the IR does not hold."""
    return kernel == m and not m.unmodelled


def _builds(build: Callable[..., Any], *args: Any) -> bool:
    try:
        build(*args)
    except Punt:
        return False
    return True


def disjoint(a: RouteMatch, b: RouteMatch) -> bool:
    """True only when no request matches both (methods or literal paths
    differ). Conservative: it may say False for disjoint matchers (headers,
    queries, DFAs and case-insensitive paths are not compared). Read by
    fastpath.inbound_verdict and the synthesis' limiter rule."""
    if a.method is not None and b.method is not None and a.method != b.method:
        return True
    la, lb = a.literal_path(), b.literal_path()
    if la is None or lb is None:
        return False
    if la[0] == "exact" and lb[0] == "exact":
        return la[1] != lb[1]
    return not (la[1].startswith(lb[1]) or lb[1].startswith(la[1]))


__all__ = ["CATCH_ALL", "MAX_QMATCH", "disjoint", "is_exact", "kernel_part"]
