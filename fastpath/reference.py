"""Reference model: the kernel's decision for one request, in pure Python, over a KernelPlan.

The oracle of the differential tests (tests/split) against real Envoy, and the
specification the C synthesis follows. Owned by the split; anyone may call
`decide`. Pure: randomness (weighted clusters, fault percentages, endpoint
choice) comes from the ``rng`` argument, rate-limit buckets from ``state``.

Decision kinds:

* ``forward``: the kernel sends the (rewritten) request to ``cluster``/``endpoint``;
* ``reply``: the kernel answers itself (deny 403, direct_response, redirect,
  404 no route, 429 rate limited, fault abort) and the upstream never sees it;
* ``envoy``: the kernel hands the request to Envoy (punt route, listener or RBAC
  that needs Envoy, a path that needs normalisation, an upgrade...).

``decide`` is l7fp_decide (the decision program the kernel_decide tests run);
``decide_datapath`` adds what the data path does after it with hop-by-hop
headers (bpf_src/dp_hop.h, fastpath.hop): the whole kernel path.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fastpath.hop import MATCH_AFTER_REMOVAL, kernel_hop
from fastpath.inbound_merge import merged_name
from fastpath.mirror import sampled
from fastpath.plan import (
    ClusterAction,
    DirectResponse,
    Endpoint,
    HeaderMatch,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    Permission,
    Principal,
    Rbac,
    Redirect,
    RegexDfa,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
    VirtualHost,
)
from fastpath.regex_dfa import RegexUnsupported, compile_dfa, dfa_full_match
from fastpath.request_id import added_headers
from fastpath.rewrite import CONST_BYTES, ORIGINAL_PATH, rewritten
from fastpath.synth_tables import punt_match
from fastpath.tracing import TRACE_REASON, b3_lines, punts

RBAC_DENIED_BODY = "RBAC: access denied"
FAULT_BODY = "fault filter abort"
RATE_LIMITED_BODY = "local_rate_limited"
# Bytes allowed in a path the kernel matches without normalisation; anything else
# (percent-escapes, backslashes, dot segments, "//") goes to Envoy.
_SAFE_PATH = CONST_BYTES | {"?"}  # a rewrite constant's bytes and the query's start
# Methods Envoy 1.40's HTTP/1 codec accepts (Balsa's list; any other word it
# answers 400 itself). The kernel forwards only those of at most 8 bytes
# (l7fp_http.h l7fp_known_method; CONNECT is an upgrade): the rest go to Envoy.
# tests/split/test_methods_envoy.py checks the list against the binary.
ENVOY_METHODS = frozenset((
    "ACL BIND CHECKOUT CONNECT COPY DELETE GET HEAD LINK LOCK MERGE MKACTIVITY MKCALENDAR "
    "MKCOL MOVE MSEARCH NOTIFY OPTIONS PATCH POST PROPFIND PROPPATCH PURGE PUT REBIND REPORT "
    "SEARCH SOURCE SUBSCRIBE TRACE UNBIND UNLINK UNLOCK UNSUBSCRIBE").split())
KERNEL_METHODS = frozenset(m for m in ENVOY_METHODS if len(m) <= 8)


@dataclass(frozen=True)
class Request:
    """An HTTP/1.1 request as the kernel parses it. Header names lower case."""

    method: str
    path: str  # with the query string
    host: str
    headers: tuple[tuple[str, str], ...] = ()
    src_ip: str = "127.0.0.1"
    dst_port: int = 0

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        if name == ":method":
            return self.method
        if name in (":authority", "host"):
            return self.host
        if name == ":path":
            return self.path
        return ",".join(values) if values else None


@dataclass(frozen=True)
class Decision:
    kind: str  # "forward" | "reply" | "envoy"
    status: int = 0
    body: str = ""
    cluster: str = ""
    endpoint: Endpoint | None = None
    path: str = ""  # forwarded path (after rewrite)
    host: str = ""  # forwarded host (after rewrite)
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    location: str = ""
    route: str = ""
    reason: str = ""
    delay_ms: int = 0  # held this long (fault delay): a forward before the upstream sees it,
    # a fault abort's reply before the client gets it
    headers: tuple[tuple[str, str], ...] = ()  # a reply's extra header lines (rate limit)
    mirrors: tuple[str, ...] = ()  # forward: clusters a shadow copy goes to (fastpath.mirror)
    hop_removed: tuple[str, ...] = ()  # forward: hop-by-hop headers the data path removed
    # forward: the lines the data path appends after the request's headers, before
    # add_headers (x-forwarded-proto, x-request-id: fastpath.request_id.added_headers)
    hcm_added: tuple[tuple[str, str], ...] = ()
    # forward on a Zipkin listener (ListenerPlan.trace_provider): the b3 lines the
    # data path appends after add_headers, values as regexes (fastpath.tracing.b3_lines),
    # when its id is not sampled; a sampled id's request goes to Envoy
    # (reason trace_sampled, fastpath.tracing.zipkin_forwards)
    trace_added: tuple[tuple[str, str], ...] = ()


@dataclass
class Bucket:
    """A token bucket as Envoy's local_ratelimit keeps it (starts full)."""

    limit: LocalRateLimit
    tokens: float = -1.0
    last_ms: float = 0.0

    def take(self, now_ms: float) -> bool:
        lim = self.limit
        if self.tokens < 0:
            self.tokens, self.last_ms = lim.max_tokens, now_ms
        if lim.fill_interval_ms > 0:
            fills = int((now_ms - self.last_ms) // lim.fill_interval_ms)
            if fills:
                self.tokens = min(lim.max_tokens, self.tokens + fills * lim.tokens_per_fill)
                self.last_ms += fills * lim.fill_interval_ms
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class State:
    """Rate-limit buckets by owner key, the clock (ms), round-robin counters by
    cluster, and LEAST_REQUEST's requests in flight by (cluster, endpoint index
    among the cluster's endpoints the pick chooses from): the caller (a
    differential test) sets those, as the kernel's counts stand."""

    buckets: dict[str, Bucket] = field(default_factory=dict)
    now_ms: float = 0.0
    rr: dict[str, int] = field(default_factory=dict)
    in_flight: dict[tuple[str, int], int] = field(default_factory=dict)

    def take(self, key: str, limit: LocalRateLimit) -> bool:
        return self.buckets.setdefault(key, Bucket(limit)).take(self.now_ms)


def decide(plan: KernelPlan, listener: str, req: Request, rng: random.Random | None = None,
           state: State | None = None) -> Decision:
    """The kernel's decision for ``req`` arriving on listener ``listener`` (by name)."""
    rng = rng or random.Random(0)
    state = state or State()
    lp = next((x for x in plan.listeners if x.name == listener), None)
    if lp is None:
        return Decision("envoy", reason=f"no listener {listener!r} in the plan")
    if lp.verdict is Verdict.ENVOY:
        return Decision("envoy", reason=f"listener: {lp.reason}")
    why = _unparseable(req)
    if why:
        return Decision("envoy", reason=why)
    vh = select_vhost(lp.virtual_hosts, req.host)
    try:
        route = kernel_route(lp, req)
    except QueryUndecidable as e:
        return Decision("envoy", reason=str(e))
    if route is not None and route.verdict is Verdict.ENVOY:
        return Decision("envoy", route=route.name, reason=route.reason)
    rbacs = iter(lp.rbacs or ((lp.rbac,) if lp.rbac else ()))
    for kind in lp.filter_order:  # the HCM's http_filters order; the router comes last
        if kind == "rbac":
            # filter_order's default names an RBAC slot even for a listener
            # without one: no filter there means nothing to enforce.
            rbac = next(rbacs, None)
            d = _rbac_filter(rbac, lp, req) if rbac is not None else None
        else:
            d = _FILTERS[kind](lp, vh, route, req, rng, state)
        if d is not None:
            return d
    if vh is None:
        return Decision("reply", status=404, reason="no virtual host")
    if route is None:
        return Decision("reply", status=404, reason="no route")
    return _delayed(route, _apply(plan, route, req, rng, state, vh), rng)


def decide_datapath(plan: KernelPlan, listener: str, req: Request,
                    rng: random.Random | None = None, state: State | None = None) -> Decision:
    """The kernel path's decision: ``decide``, then the data path's hop-by-hop
    step (dp_hop.h): a forward or reply whose Connection / Proxy-Connection /
    TE the kernel does not handle as Envoy goes to Envoy (reason
    ``conn_close`` or ``hop_header``), except a 429 reply (a kernel-owned
    bucket's, whose Envoy copy is off); a forward's Connection: keep-alive,
    Keep-Alive and Proxy-Connection: keep-alive are removed. Before that step,
    dp_msg_rwin's: a forward whose rewritten path the destination's inbound
    decision cannot take goes to Envoy (reason ``path_rewrite``). After it,
    dp_xrid.h's: a forward gets x-forwarded-proto and x-request-id where it
    lacks them (``hcm_added``); on a tracing listener a forward with a
    trace header (fastpath.tracing.punts) goes to Envoy (``trace_header``),
    on a Zipkin one a forward gets ``trace_added``."""
    d = decide(plan, listener, req, rng, state)
    if d.kind == "envoy" or (d.kind == "reply" and d.status == 429):
        return d
    if _rewrite_undecided(plan, d, req):
        return Decision("envoy", route=d.route, reason="path_rewrite")
    why, kept = kernel_hop(req.headers)
    if why:
        return Decision("envoy", route=d.route, reason=why)
    if d.kind != "forward":
        return d
    lp = next((x for x in plan.listeners if x.name == listener), None)
    sampling, tracer = (lp.trace_sampling, lp.trace_provider) if lp else (None, "")
    if sampling is not None and any(punts(n.lower(), tracer) for n, _ in req.headers):
        return Decision("envoy", route=d.route, reason=TRACE_REASON)
    d = replace(d, hcm_added=added_headers(req.headers, sampling), trace_added=b3_lines() if tracer else ())
    if len(kept) == len(req.headers):
        return d
    return replace(d, hop_removed=tuple(n for n, _ in req.headers if n in MATCH_AFTER_REMOVAL))


def _rewrite_undecided(plan: KernelPlan, d: Decision, req: Request) -> bool:
    """dp_msg_rwin (bpf_src/sk_msg.c): a forward whose route rewrote the path,
    to an endpoint with an inbound decision (its listener merged into the
    plan, fastpath.inbound_merge), goes to Envoy when the new path is one
    the inbound sidecar may normalize (dp_rewrite.h dp_rw_dotseg)."""
    if d.kind != "forward" or d.endpoint is None or d.path == req.path:
        return False
    name = merged_name(d.endpoint.address, d.endpoint.port)
    if not any(lp.name == name for lp in plan.listeners):
        return False
    return not d.path.startswith("/") or has_dot_segments(d.path)


def _delayed(route: Route, d: Decision, rng: random.Random) -> Decision:
    """Envoy's fault delay: a sampled share of the route's forwarded requests waits
    ``delay_ms`` before the router sends it (a fault abort's reply: _fault_filter;
    classify_delay keeps other replies and a route timeout with a delay ENVOY)."""
    fd = route.fault_delay
    if fd is None or d.kind != "forward" or rng.randrange(1_000_000) >= fd.per_million:
        return d
    return replace(d, delay_ms=fd.delay_ms)


def _rbac_filter(rbac: Rbac, lp: ListenerPlan, req: Request) -> Decision | None:
    denied = _rbac_denies(rbac, req, lp)
    if denied is None:
        return Decision("envoy", reason=f"rbac: {rbac.reason}")
    return Decision("reply", status=403, body=RBAC_DENIED_BODY, reason="rbac deny") if denied else None


def _rate_limit_filter(lp: ListenerPlan, vh: VirtualHost | None, route: Route | None, req: Request,
                       rng: random.Random, state: State) -> Decision | None:
    # A route's own bucket replaces the listener's (Envoy per-route config).
    if route is not None and route.rate_limit is not None and vh is not None:
        limit, key = route.rate_limit, f"route/{lp.name}/{vh.name}/{route.name}"
    elif lp.local_rate_limit is not None:
        limit, key = lp.local_rate_limit, f"listener/{lp.name}"
    else:
        return None
    if state.take(key, limit) or rng.randrange(1_000_000) >= limit.enforced_per_million:
        return None
    return Decision("reply", status=limit.status, body=RATE_LIMITED_BODY,
                    route=route.name if route else "", headers=limit.response_headers)


def _fault_filter(lp: ListenerPlan, vh: VirtualHost | None, route: Route | None, req: Request,
                  rng: random.Random, state: State) -> Decision | None:
    fault = route.fault_abort if route is not None else lp.fault_abort
    if fault is None or rng.randrange(1_000_000) >= fault.per_million:
        return None
    fd = route.fault_delay if route is not None else None  # Envoy aborts after the delay
    wait = fd.delay_ms if fd is not None and rng.randrange(1_000_000) < fd.per_million else 0
    return Decision("reply", status=fault.status, body=FAULT_BODY, route=route.name if route else "",
                    delay_ms=wait)


_FILTERS = {"local_ratelimit": _rate_limit_filter, "fault": _fault_filter}


def _unparseable(req: Request) -> str:
    if req.method not in KERNEL_METHODS:
        # l7fp_http.h: a method outside Envoy's list or of more than 8 bytes is
        # L7FP_R_METHOD. Envoy 1.40 answers "post", "Get", "M-SEARCH", "QUERY" 400 itself.
        return "method the kernel does not forward (Envoy's methods of at most 8 bytes)"
    path = req.path
    if not path.startswith("/") or any(c not in _SAFE_PATH for c in path):
        return "path needs normalisation or escaping"
    if has_dot_segments(path):
        return "path has dot segments or empty segments"
    if req.header("upgrade") is not None or req.header("expect") is not None or req.method == "CONNECT":
        return "upgrade/expect request"
    if any(n == "content-type" and (v == "application/grpc" or v.startswith("application/grpc+"))
           for n, v in req.headers):
        return "gRPC request (Envoy's local replies to it are gRPC ones)"
    if req.header("grpc-timeout") is not None:
        return "grpc-timeout header (Envoy may enforce it as a timeout)"
    if any(n.startswith("x-envoy-") and len(n) > 8 for n, _ in req.headers):
        # Envoy acts on, strips or overwrites these (tests/split/test_stripped_headers_envoy.py)
        return "x-envoy-* header (Envoy may act on it, strip it or overwrite it)"
    if req.header("x-forwarded-client-cert") is not None:
        return "x-forwarded-client-cert header (Envoy's default SANITIZE strips it)"
    return ""


def has_dot_segments(path: str) -> bool:
    """The path (query left out) has `//`, `/./`, `/../` or ends in `/.` or `/..`:
    what Envoy's path normalisation would change (dp_rewrite.h dp_rw_dotseg)."""
    p = path.split("?", 1)[0]
    return "//" in p or "/./" in p or "/../" in p or p.endswith(("/.", "/.."))


def first_route(lp: ListenerPlan, req: Request) -> Route | None:
    """The route Envoy picks: the virtual host the Host selects, its first route
    whose matcher matches (None: no virtual host or no route). Raises
    QueryUndecidable like route_matches."""
    vh = select_vhost(lp.virtual_hosts, req.host)
    if vh is None:
        return None
    return next((r for r in vh.routes if route_matches(r.match, req)), None)


def kernel_route(lp: ListenerPlan, req: Request) -> Route | None:
    """The route the kernel stops at: first_route, but an ENVOY route (a punt
    entry) matches by the part of its matcher the kernel evaluates
    (synth_tables.punt_match, a superset of what it matches): a request that
    may match it goes to Envoy, whatever the parts left out say. Every
    request whose Envoy route is KERNEL and no earlier punt may take gets
    that route, so a forward or reply still equals Envoy's."""
    vh = select_vhost(lp.virtual_hosts, req.host)
    if vh is None:
        return None
    return next((r for r in vh.routes if route_matches(
        punt_match(r.match) if r.verdict is Verdict.ENVOY else r.match, req)), None)


def select_vhost(vhosts: tuple[VirtualHost, ...], host: str) -> VirtualHost | None:
    """Envoy's order: exact, then longest suffix wildcard, longest prefix wildcard, "*"."""
    host = host.lower()
    best: tuple[int, int, VirtualHost] | None = None
    for vh in vhosts:
        for d in vh.domains:
            rank = _domain_rank(d, host)
            if rank is not None and (best is None or rank > best[:2]):
                best = (rank[0], rank[1], vh)
    return best[2] if best else None


def _domain_rank(d: str, host: str) -> tuple[int, int] | None:
    if d == host:
        return (4, len(d))
    if d == "*":
        return (1, 0)
    if d.startswith("*") and host.endswith(d[1:]) and len(host) > len(d) - 1:
        return (3, len(d))
    if d.endswith("*") and host.startswith(d[:-1]) and len(host) > len(d) - 1:
        return (2, len(d))
    return None


def _path_only(path: str) -> str:
    return path.split("?", 1)[0].split("#", 1)[0]


def route_matches(m: RouteMatch, req: Request) -> bool:
    """Envoy RouteMatch semantics over the kernel-enforceable subset."""
    path = _path_only(req.path)
    cs = m.case_sensitive
    fold = (lambda s: s) if cs else str.lower
    if m.path_kind is PathKind.PREFIX:
        ok = fold(path).startswith(fold(m.path))
    elif m.path_kind is PathKind.EXACT:
        ok = fold(path) == fold(m.path)
    elif m.path_kind is PathKind.PATH_SEPARATED_PREFIX:
        ok = fold(path) == fold(m.path) or fold(path).startswith(fold(m.path) + "/")
    elif m.regex_literal is not None:
        ok = path == m.regex_literal
    elif m.regex_prefix is not None:
        ok = path.startswith(m.regex_prefix)
    elif m.regex_dfa is not None:
        ok = bool(dfa_full_match(m.regex_dfa, path))  # ASCII only: _unparseable checked
    else:
        return False  # a true regex is never KERNEL
    if not ok:
        return False
    if m.grpc and not (req.header("content-type") or "").startswith("application/grpc"):
        return False
    if not all(_route_header_matches(h, req) for h in m.headers):
        return False
    return all(_query_matches(q.name, q.match, req) for q in m.query_params)


def string_matches(sm: StringMatch, value: str) -> bool:
    v, want = (value.lower(), sm.value.lower()) if sm.ignore_case else (value, sm.value)
    if sm.kind is StringKind.EXACT:
        return v == want
    if sm.kind is StringKind.PREFIX:
        return v.startswith(want)
    if sm.kind is StringKind.SUFFIX:
        return v.endswith(want)
    if sm.kind is StringKind.CONTAINS:
        return want in v
    if sm.kind is StringKind.REGEX:  # RE2 full match; ignore_case has no effect (Envoy)
        return _regex_full_match(sm.value, value)
    return sm.kind is StringKind.PRESENT


@functools.lru_cache(maxsize=256)
def _header_dfa(pattern: str) -> RegexDfa | None:
    try:
        return compile_dfa(pattern)
    except RegexUnsupported:
        return None


def _regex_full_match(pattern: str, value: str) -> bool:
    """A header regex the kernel walks as a DFA (fastpath.synth_dfa); a value
    with bytes outside ASCII never matches here (the kernel hands it to Envoy)."""
    dfa = _header_dfa(pattern)
    return bool(dfa is not None and dfa_full_match(dfa, value))


def header_matches(h: HeaderMatch, req: Request) -> bool:
    value = req.header(h.name)
    if value is None and not h.treat_missing_as_empty:
        # A missing header (Envoy 1.40, checked by tests/split): present/absent
        # matchers follow invert; a value matcher fails even when inverted.
        if h.absent:
            return not h.invert
        return h.invert if h.match is None else False
    value = value or ""
    if h.absent:
        return h.invert
    ok = True if h.match is None else string_matches(h.match, value)
    return ok != h.invert


def _route_header_matches(h: HeaderMatch, req: Request) -> bool:
    """A route's header matcher as the kernel evaluates it: a header the
    request carries twice is undecidable there (Envoy matches the joined
    values; l7fp_match.h records one value per slot): the request goes to Envoy."""
    if sum(1 for k, _ in req.headers if k == h.name) > 1:
        raise QueryUndecidable(f"header {h.name} twice (Envoy matches the joined values)")
    return header_matches(h, req)


class QueryUndecidable(Exception):
    """A query-parameter matcher the kernel cannot evaluate on this request."""


MAX_QUERY = 128  # query bytes the kernel scans (L7FP_MAX_QUERY)
MAX_QUERY_PARAMS = 8  # parameters it records (L7FP_MAX_QPARAMS)


def query_value(name: str, path: str) -> str | None:
    """Envoy 1.40's value of query parameter ``name`` (tests/split/test_query_envoy.py):
    split on '&', empty parameters skipped, the name up to the first '=', a
    parameter without '=' has the value "", the first occurrence counts.
    Raises QueryUndecidable where the kernel hands the request to Envoy."""
    if "?" not in path:
        return None
    query = path.split("?", 1)[1]
    params = [p for p in query.split("&") if p]
    if "+" in query:  # Envoy may decode it as a space
        raise QueryUndecidable("query string with '+'")
    if len(query) > MAX_QUERY or len(params) > MAX_QUERY_PARAMS:
        raise QueryUndecidable("query string longer than the kernel scans")
    for p in params:
        key, _, value = p.partition("=")
        if key == name:
            return value
    return None


def _query_matches(name: str, sm: StringMatch | None, req: Request) -> bool:
    value = query_value(name, req.path)
    if value is None:
        return False
    return True if sm is None else string_matches(sm, value)


def _apply(plan: KernelPlan, r: Route, req: Request, rng: random.Random, state: State,
           vh: VirtualHost) -> Decision:
    name = r.name
    a = r.action
    if isinstance(a, DirectResponse):
        return Decision("reply", status=a.status, body=a.body, route=name)
    if isinstance(a, Redirect):
        return Decision("reply", status=a.status, location=location(a, r.match, req), route=name)
    assert isinstance(a, ClusterAction)
    cluster = _pick_cluster(a, rng)
    path = req.path
    extra: tuple[tuple[str, str], ...] = ()
    if a.prefix_rewrite or a.path_rewrite is not None:
        if req.header(ORIGINAL_PATH) is not None:  # Envoy overwrites it in place
            return Decision("envoy", route=name, reason=f"{ORIGINAL_PATH} in the request")
        extra = ((ORIGINAL_PATH, req.path),)  # Envoy adds it with either rewrite
    if a.prefix_rewrite:  # "" is no rewrite (proto3: unset)
        path = _prefix_rewrite(r.match, path, a.prefix_rewrite)
    if a.path_rewrite is not None:
        path = rewritten(a.path_rewrite, path)
    c = plan.cluster(cluster)
    ep = _pick_endpoint(c.endpoints, c.lb_policy, rng, state, cluster) if c else None
    # Route-level adds first, then the virtual host's (Envoy's order; the split
    # folds both into the route, a hand-built plan may use either).
    adds = tuple((h.name, h.value) for h in r.request_headers_to_add + vh.request_headers_to_add)
    adds += extra  # x-envoy-original-path: Envoy's last header line
    return Decision("forward", cluster=cluster, endpoint=ep, path=path,
                    host=a.host_rewrite or req.host, add_headers=adds,
                    remove_headers=r.request_headers_to_remove, route=name,
                    mirrors=_mirrors(plan, a, req.headers + adds, rng))


def _mirrors(plan: KernelPlan, a: ClusterAction, headers: tuple[tuple[str, str], ...],
             rng: random.Random) -> tuple[str, ...]:
    """The clusters of the policies whose fraction samples this request (one
    draw per policy, as the kernel and Envoy's runtime do). A cluster_header
    policy names the first value of its header in `headers` (the request's,
    then the route's adds): none, empty or no cluster of the plan with a host
    to send to sends nothing (fastpath.mirror.header_cluster)."""
    out = []
    for m in a.mirrors:
        if not sampled(m.per_million, rng.getrandbits(32)):
            continue
        if not m.cluster_header:
            out.append(m.cluster)
            continue
        name = next((v.strip() for k, v in headers if k.lower() == m.cluster_header), "")
        c = plan.cluster(name) if name else None
        if c is not None and c.endpoints and not c.original_dst:
            out.append(name)
    return tuple(out)


def _prefix_rewrite(m: RouteMatch, path: str, rewrite: str) -> str:
    """Envoy replaces the matched part: the prefix, or the whole path (exact, regex)."""
    if m.path_kind in (PathKind.PREFIX, PathKind.PATH_SEPARATED_PREFIX):
        return rewrite + path[len(m.path):]
    _, sep, query = path.partition("?")
    return rewrite + sep + query


def _pick_cluster(a: ClusterAction, rng: random.Random) -> str:
    total = sum(c.weight for c in a.clusters)
    if len(a.clusters) == 1 or total <= 0:
        return a.clusters[0].name
    x = rng.randrange(total)
    for c in a.clusters:
        if x < c.weight:
            return c.name
        x -= c.weight
    return a.clusters[-1].name


def _pick_endpoint(eps: tuple[Endpoint, ...], lb: LbPolicy, rng: random.Random, state: State,
                   key: str) -> Endpoint | None:
    healthy = [e for e in eps if e.healthy]
    # Envoy's panic threshold (50 %): below it, all endpoints are used.
    pool = healthy if eps and len(healthy) * 2 >= len(eps) else list(eps)
    if not pool:
        return None
    if lb is LbPolicy.ROUND_ROBIN:
        i = state.rr.get(key, 0)
        state.rr[key] = i + 1
        return pool[i % len(pool)]
    # RANDOM: Envoy 1.40 ignores endpoint weights (measured: 1:9 gives ~50 %/50 %),
    # as the kernel does; LEAST_REQUEST and ROUND_ROBIN with unequal weights are
    # ENVOY (fastpath.classify), so a KERNEL plan's pool here has equal weights.
    if lb is LbPolicy.LEAST_REQUEST and len(pool) > 1:
        return pool[least_request_pick(len(pool), rng, lambda i: state.in_flight.get((key, i), 0))]
    return rng.choices(pool)[0]


def least_request_pick(n: int, rng: random.Random, in_flight: Callable[[int], int]) -> int:
    """Envoy 1.40's unweighted LEAST_REQUEST pick among `n` endpoints, as the
    kernel makes it (l7fp_decide.h l7fp_pick_lr): two independent draws, the
    endpoint with fewer requests in flight, a tie keeps the first draw."""
    first, second = rng.randrange(n), rng.randrange(n)
    return second if in_flight(second) < in_flight(first) else first


def location(a: Redirect, m: RouteMatch, req: Request) -> str:
    """Envoy's redirect URI (RouteEntryImplBase::newUri) for a plain-HTTP request.
    Called by the reference model and by the agent (fastpath.agent_redirect),
    which answers the kernel's redirect routes with it: one function for both."""
    scheme = a.scheme or "http"
    host = a.host or req.host
    if not a.host and ":" in req.host:
        name, port = req.host.rsplit(":", 1)
        # The request's port goes when a new port is given, or when the scheme
        # changes and it was the default port of the old one.
        if a.port is not None or (scheme != "http" and port == "80"):
            host = name
    if a.port is not None:
        host = f"{host.rsplit(':', 1)[0] if a.host else host}:{a.port}"
    path, _, query = req.path.partition("?")
    if a.path is not None:
        path = a.path
    elif a.prefix_rewrite is not None and m.path_kind is PathKind.PREFIX:
        path = a.prefix_rewrite + path[len(m.path):]
    if query and not a.strip_query and "?" not in path:
        path = f"{path}?{query}"
    return f"{scheme}://{host}{path}"


def _rbac_denies(rbac: Rbac, req: Request, lp: ListenerPlan) -> bool | None:
    """True: deny, False: allow, None: the kernel can't tell (ENVOY)."""
    if rbac.verdict is Verdict.ENVOY:
        return None
    hit = any(_policy_matches(p.permissions, p.principals, req, lp) for p in rbac.policies)
    return hit if rbac.action == "DENY" else not hit


def _policy_matches(perms: tuple[tuple[Permission, ...], ...],
                    prins: tuple[tuple[Principal, ...], ...], req: Request, lp: ListenerPlan) -> bool:
    return any(all(_perm(p, req, lp) for p in g) for g in perms) and \
        any(all(_prin(p, req) for p in g) for g in prins)


def _perm(p: Permission, req: Request, lp: ListenerPlan) -> bool:
    ok = True
    if p.path is not None:
        ok = ok and string_matches(p.path, _path_only(req.path))
    if p.method is not None:
        ok = ok and req.method == p.method
    if p.port is not None:
        ok = ok and (req.dst_port or lp.port) == p.port
    ok = ok and all(header_matches(h, req) for h in p.headers)
    return ok != p.invert


def _prin(p: Principal, req: Request) -> bool:
    ok = True
    if p.source_cidr is not None:
        ok = ipaddress.ip_address(req.src_ip) in ipaddress.ip_network(p.source_cidr, strict=False)
    if p.header is not None:
        ok = ok and header_matches(p.header, req)
    if p.authenticated is not None:
        ok = False
    return ok != p.invert
