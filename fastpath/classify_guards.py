"""Guards: Envoy filters that act only on requests of a recognisable kind.

Called by `fastpath.classify_route` (per route, from the HCM's filters and
their per-route configs) and `fastpath.classify` (which puts the guard entries
before the route). Owned by the split.

Envoy's CORS filter does nothing to a request without an ``Origin`` header
(not even response headers: it only marks CORS requests), and the CSRF filter
only checks mutating methods (POST, PUT, DELETE, PATCH). So such a route needs
Envoy only for those requests: the classifier keeps the route KERNEL and puts
before it a punt entry (``Route.guard``) with the route's own matcher plus
"Origin present" / "method is M". First match keeps the rest exact: a request
the guard takes goes to Envoy, which applies both the filter and the route.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fastpath.classify_match import Reasons
from fastpath.plan import HeaderMatch, Route, StringKind, StringMatch, Verdict

CSRF_METHODS = ("POST", "PUT", "DELETE", "PATCH")  # Envoy csrf filter: modifyMethod()


@dataclass(frozen=True)
class Guard:
    """Requests matching this (besides the route's matcher) go to Envoy."""

    why: str
    header_present: str | None = None
    method: str | None = None
    header_exact: tuple[str, str] | None = None  # (name, value)


def _enabled(policy: dict[str, Any]) -> bool:
    """A RuntimeFractionalPercent `filter_enabled` other than 0 (absent: 100 %).

    Shadow mode only counts stats, so it changes no request."""
    fe = policy.get("filterEnabled")
    if fe is None:
        return True
    return int(fe.get("defaultValue", {}).get("numerator", 0)) > 0


def cors_guards(policy: dict[str, Any]) -> list[Guard]:
    """A CORS policy in force: requests with Origin go to Envoy."""
    if not _enabled(policy):
        return []
    return [Guard("CORS request (Origin header): Envoy's CORS filter", header_present="origin")]


def csrf_guards(policy: dict[str, Any]) -> list[Guard]:
    """A CSRF policy in force: mutating requests go to Envoy (it checks their origin)."""
    if not _enabled(policy):
        return []
    return [Guard(f"{m} request: Envoy's CSRF filter checks its origin", method=m) for m in CSRF_METHODS]


def mirror_header_guards(pairs: tuple[tuple[str, str], ...]) -> list[Guard]:
    """Requests whose cluster_header names a cluster the kernel path cannot
    shadow to as Envoy would (fastpath.mirror.header_guard_names) go to Envoy."""
    return [Guard(f"request with {h}: {n} (mirror cluster_header naming a cluster the "
                  "kernel path cannot shadow to)", header_exact=(h, n)) for h, n in pairs]


def guard_routes(route: Route, guards: list[Guard]) -> tuple[list[Route], Reasons]:
    """The punt entries to put before ``route`` (KERNEL), and reasons when it
    cannot be guarded (its rate-limit bucket would then be split between the
    kernel and Envoy)."""
    if route.verdict is not Verdict.KERNEL or not guards:
        return [], []
    if route.rate_limit is not None:
        return [], [g.why + " on a rate-limited route" for g in guards[:1]]
    out = []
    for g in guards:
        m = route.match
        if g.header_present:
            m = replace(m, headers=m.headers + (HeaderMatch(g.header_present),))
        if g.header_exact:
            exact = StringMatch(StringKind.EXACT, g.header_exact[1])
            m = replace(m, headers=m.headers + (HeaderMatch(g.header_exact[0], exact),))
        if g.method:
            if m.method and m.method != g.method:
                continue  # the route never sees this method
            if m.method is None:  # the matchers read headers, not the `method` shortcut
                is_m = HeaderMatch(":method", StringMatch(StringKind.EXACT, g.method))
                m = replace(m, method=g.method, headers=m.headers + (is_m,))
        out.append(replace(route, match=m, verdict=Verdict.ENVOY, reason=g.why, fault_abort=None,
                           guard=True))
    return out, []
