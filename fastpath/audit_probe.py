"""Requests that exercise each KERNEL route of a KernelPlan: the sans-I/O half of `l7fp mesh audit`.

Owned by the split (it reads only fastpath.plan and asks fastpath.reference).
`mesh.audit` calls `probes(plan)` for every node, sends each probe's request
from that node's pod and reads who served it. For each KERNEL route of an
outbound listener it derives one request the route matches first: a host of
its virtual host, a path from its matcher (prefix, exact, path-separated
prefix, regex literal / prefix / DFA), its method, its required headers and
query parameters. The reference model must agree that this route is the one
chosen (the virtual host select and first match win), else the next candidate
is tried; a route no candidate reaches is skipped with the reason named
(shadowed by an earlier route, a matcher no value satisfies, ...).
`inbound_probes` does the same for the routes of a pod's inbound listener,
sent by a caller pod through an outbound route that forwards to the pod.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

from fastpath.inbound_merge import merged_name
from fastpath.plan import (
    ClusterAction,
    Direction,
    HeaderMatch,
    KernelPlan,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    RegexDfa,
    Route,
    RouteMatch,
    StringKind,
    StringMatch,
    Verdict,
    VirtualHost,
)
from fastpath.reference import (
    Decision,
    QueryUndecidable,
    Request,
    State,
    decide_datapath,
    first_route,
    has_dot_segments,
    header_matches,
    select_vhost,
    string_matches,
)
from fastpath.regex_dfa import RegexUnsupported, compile_dfa
from fastpath.rewrite import CONST_BYTES

FILLER = "l7fp-audit"  # what a probe puts where the matcher allows anything
# Bytes a derived path may use: what the kernel matches without normalisation.
_PATH_BYTES = sorted(ord(c) for c in CONST_BYTES)
_VALUE_BYTES = list(range(0x21, 0x7F))  # a header or query value: visible ASCII
# A query value sent as it is: no byte Envoy would decode or split on ('%', '+',
# '&', '=', '#'), none the kernel hands to Envoy (outside CONST_BYTES).
_QUERY_VALUE_BYTES = CONST_BYTES - set("&=+")
_MAX_CANDIDATES = 64  # header/query value combinations tried per route
NOT_FORWARDED = "no route of the caller's listener"  # a skip: the caller never reaches the pod
_HOST_NAMES = (":authority", "host")  # header matchers the request's Host line satisfies
# Pseudo-headers a probe cannot set: the request line's target is the path
# (a :path matcher would need a path from it) and the scheme is http.
_UNSENDABLE = (":path", ":scheme")


@dataclass(frozen=True)
class Probe:
    """One KERNEL route and the request that exercises it (None: skipped, `skip` says why).

    `expect` is the reference model's decision for that request on the node's
    own plan (`forward CLUSTER`, `reply STATUS`, `envoy: REASON`); for an
    inbound route the caller's decision, then the destination's inbound one
    on the destination's own plan (the agent's merge may still punt it)."""

    listener: str
    vhost: str
    route: str
    address: str
    port: int
    request: Request | None
    skip: str = ""
    expect: str = ""
    via: str = ""  # an inbound route's probe: the caller's outbound route it goes through
    dst: tuple[str, int] | None = None  # an inbound route's probe: the destination pod's ip, port
    dst_version: str = ""  # and the version of the destination's plan it was derived from
    # the status the kernel must answer with whatever it samples (a deny, a
    # direct response, a 100% fault abort); None: it forwards, or it samples
    reply: int | None = None

    @property
    def full_name(self) -> str:
        """The route's name in the plan: LISTENER/VHOST/ROUTE."""
        return f"{self.listener}/{self.vhost}/{self.route}"

    @property
    def counted_as(self) -> str:
        """The route's name in the sender's fast-path counters (fastpath.synth_tables):
        an inbound route's under the caller's merged copy of this destination's
        listener (fastpath.inbound_merge.merged_name), never a replica's."""
        if self.dst is None:
            return self.full_name
        return f"{merged_name(*self.dst)}/{self.vhost}/{self.route}"


def probes(plan: KernelPlan, src_ip: str = "127.0.0.1") -> list[Probe]:
    """One Probe per KERNEL route (guards left out) of the plan's listeners, in plan order.

    Routes of inbound listeners are skipped here: their requests arrive from
    other pods and are decided in the callers' kernels (fastpath.inbound_merge);
    `inbound_probes` derives them through a caller."""
    out = []
    for lp in plan.listeners:
        for vh in lp.virtual_hosts:
            for r in vh.routes:
                if r.verdict is Verdict.KERNEL and not r.guard:
                    out.append(_probe(plan, lp, vh, r, src_ip))
    return out


def _probe(plan: KernelPlan, lp: ListenerPlan, vh: VirtualHost, r: Route, src_ip: str) -> Probe:
    base = Probe(lp.name, vh.name, r.name, lp.address, lp.port, None)
    if lp.direction is Direction.INBOUND:
        return _skipped(base, "inbound listener: its requests come from other pods and are "
                              "decided in the callers' kernels")
    host = _host(lp, vh)
    if host is None:
        return _skipped(base, f"no host selects virtual host {vh.name!r} (domains {list(vh.domains)})")
    if _unsendable(r.match):
        return _skipped(base, _unsendable(r.match))
    first: Probe | None = None
    shadow = ""
    for req in _requests(r.match, host, src_ip, lp.port):
        try:
            chosen = first_route(lp, req)
        except QueryUndecidable as exc:
            shadow = shadow or str(exc)
            continue
        if chosen is not r:
            shadow = shadow or (f"shadowed by route {chosen.name!r}" if chosen is not None
                                else "the reference model matches no route")
            continue
        d = decide_datapath(plan, lp.name, req)
        p = replace(base, request=req, expect=_expect(d), reply=_sure_reply(plan, lp.name, req))
        # a forwarded (rewritten) path with dot segments: the data path hands it to
        # Envoy when the destination has an inbound decision (dp_rw_dotseg); the
        # reference model says so only on a plan holding the destination's merged
        # listener, and the node's plan read here has none; keep looking for another
        if d.kind != "envoy" and not (d.kind == "forward" and has_dot_segments(d.path)):
            return p
        first = first or p  # keep looking for a request the kernel can take
    if first is not None:
        return first
    return _skipped(base, shadow or "no request matches the route's matcher")


def inbound_probes(dst: KernelPlan, port: int, dst_ip: str, caller: KernelPlan,
                   out_listener: str, src_ip: str) -> list[Probe]:
    """One Probe per KERNEL route of `dst`'s inbound listener for `port`, sent by a
    pod whose plan is `caller` through its outbound listener `out_listener` (the
    service address that leads to `dst_ip`). The request must match that route
    first in the inbound listener and be forwarded by the caller's outbound
    decision to a cluster holding dst_ip:port: then the caller's kernel takes
    the destination's inbound decision too (fastpath.inbound_merge)."""
    out_lp = next(lp for lp in caller.listeners if lp.name == out_listener)
    out = []
    for lp in dst.listeners:
        if lp.direction is not Direction.INBOUND or lp.port != port:
            continue
        for vh in lp.virtual_hosts:
            for r in vh.routes:
                if r.verdict is Verdict.KERNEL and not r.guard:
                    out.append(_inbound_probe(dst, lp, vh, r, caller, out_lp, dst_ip, src_ip))
    return out


def _inbound_probe(dst: KernelPlan, lp: ListenerPlan, vh: VirtualHost, r: Route,
                   caller: KernelPlan, out_lp: ListenerPlan, dst_ip: str, src_ip: str) -> Probe:
    base = Probe(lp.name, vh.name, r.name, out_lp.address, out_lp.port, None, dst=(dst_ip, lp.port),
                 dst_version=dst.version)
    if _unsendable(r.match):
        return _skipped(base, _unsendable(r.match))
    why = ""
    found: list[Probe] = []
    for req in _inbound_requests(r, caller, out_lp, (dst_ip, lp.port), src_ip):
        d = decide_datapath(caller, out_lp.name, req)
        fwd = _forwarded(req, d)  # what the destination's inbound listener sees
        try:
            chosen = first_route(lp, fwd)
        except QueryUndecidable as exc:
            why = why or str(exc)
            continue
        if chosen is not r:
            won = f"route {chosen.name!r}" if chosen is not None else "no route"
            why = why or (f"the caller's route {d.route!r} rewrites {req.path} to {fwd.path}, "
                          f"where {won} matches" if fwd.path != req.path else
                          f"shadowed by {won}" if chosen is not None
                          else "the reference model matches no route")
            continue
        ovh = select_vhost(out_lp.virtual_hosts, req.host)
        # the route object, not its name: Istio's routes may all be named ""
        o = first_route(out_lp, req) if d.kind == "forward" else None
        some, every = _reach(caller, o, (dst_ip, lp.port))
        if not some:
            why = why or f"the caller's outbound decision for it is {_expect(d)}"
            continue
        # the kernel decides the inbound side on the client's request as parsed
        # (dp_decide_second): the lines its outbound forward adds are not in it
        inner = decide_datapath(dst, lp.name, _forwarded(req, d, adds=False))
        sure = _sure(caller, out_lp.name, req)
        p = replace(base, request=req, via=f"{out_lp.name}/{ovh.name if ovh else ''}/{d.route}",
                    expect=f"{_expect(d)}, then inbound {_expect(inner)} (destination plan {dst.version})",
                    reply=_sure_reply(dst, lp.name, fwd) if sure and sure.kind == "forward"
                    else None)
        if every:
            return p
        found.append(p)
    if found:  # the caller's route may pick another destination: said in `expect`
        return replace(found[0], expect=found[0].expect + " (if the kernel picks this pod)",
                       reply=None)
    return _skipped(base, why or _unreached(caller, out_lp, (dst_ip, lp.port)))


def _unreached(caller: KernelPlan, out_lp: ListenerPlan, dst: tuple[str, int]) -> str:
    """Why no KERNEL route of the caller's listener forwards to `dst`."""
    if out_lp.verdict is Verdict.ENVOY:
        return f"the caller's listener {out_lp.name} needs Envoy: {out_lp.reason}"
    for vh in out_lp.virtual_hosts:
        for o in vh.routes:
            if o.verdict is Verdict.ENVOY and _reach(caller, replace(o, verdict=Verdict.KERNEL),
                                                     dst)[0]:
                return f"the caller's route {o.name!r} to it needs Envoy: {o.reason}"
    return f"{NOT_FORWARDED} {out_lp.name} forwards to {dst[0]}:{dst[1]}"


def _forwarded(req: Request, d: Decision, adds: bool = True) -> Request:
    """The request as the caller's outbound decision forwards it: rewritten path and
    host, its header removals and (`adds`) additions (fastpath.reference.Decision)."""
    if d.kind != "forward":
        return req
    kept = tuple((n, v) for n, v in req.headers if n not in d.remove_headers)
    return replace(req, path=d.path or req.path, host=d.host or req.host,
                   headers=kept + (tuple(d.add_headers) if adds else ()))


def _inbound_requests(r: Route, caller: KernelPlan, out_lp: ListenerPlan, dst: tuple[str, int],
                      src_ip: str) -> Iterator[Request]:
    """Candidates for inbound route `r` through the caller's routes that can reach
    `dst`: r's own matcher, and r's and that route's matchers together (an
    outbound route may need a header, e.g. a canary's, to pick this pod)."""
    for ovh in out_lp.virtual_hosts:
        host = _host(out_lp, ovh)
        reaching = [o for o in ovh.routes if _reach(caller, o, dst)[0]]
        if host is None or not reaching:
            continue
        yield from _requests(r.match, host, src_ip, dst[1])
        for o in reaching:
            yield from _requests(_both(r.match, o.match), host, src_ip, dst[1])
            yield from _requests(_both(o.match, r.match), host, src_ip, dst[1])
            for path in _unrewritten(o, _paths(r.match)):
                exact = RouteMatch(PathKind.EXACT, path)
                yield from _requests(_both(exact, _both(o.match, r.match)), host, src_ip, dst[1])


def _unrewritten(o: Route, paths: list[str]) -> list[str]:
    """Paths a prefix_rewrite route `o` turns into `paths` (the inbound side sees
    the rewritten path)."""
    a = o.action
    if not isinstance(a, ClusterAction) or a.prefix_rewrite is None \
            or o.match.path_kind is not PathKind.PREFIX:
        return []
    return [o.match.path + p[len(a.prefix_rewrite):] for p in paths
            if p.startswith(a.prefix_rewrite)]


def _both(a: RouteMatch, b: RouteMatch) -> RouteMatch:
    """a's path matcher with the header and query matchers of both."""
    return replace(a, headers=a.headers + b.headers, query_params=a.query_params + b.query_params,
                   method=a.method or b.method)


def _reach(caller: KernelPlan, route: Route | None, dst: tuple[str, int]) -> tuple[bool, bool]:
    """(some pick of the caller's `route` lands on `dst`, every pick does)."""
    if route is None or route.verdict is not Verdict.KERNEL or \
            not isinstance(route.action, ClusterAction):
        return False, False
    picks = []
    for wc in route.action.clusters:
        c = caller.cluster(wc.name)
        if wc.weight > 0:
            picks.append([(e.address, e.port) for e in c.endpoints] if c is not None else [])
    return (any(dst in eps for eps in picks),
            bool(picks) and all(eps and all(e == dst for e in eps) for eps in picks))


def _skipped(p: Probe, why: str) -> Probe:
    return replace(p, request=None, skip=why)


class _Extreme(random.Random):
    """An rng that always draws its lowest (or highest) value: every sampled
    policy (fault, rate-limit enforcement, mirror, weight) taken, or none."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        lo, hi = (0, start) if stop is None else (start, stop)
        return hi - 1 if self.high else lo

    def getrandbits(self, k: int) -> int:
        return (1 << k) - 1 if self.high else 0

    def random(self) -> float:
        return 1.0 - 2 ** -53 if self.high else 0.0


class _Dry(State):
    """Rate-limit state whose buckets are all empty (other traffic spent them)."""

    def take(self, key: str, limit: LocalRateLimit) -> bool:
        return False


def _sure(plan: KernelPlan, listener: str, req: Request) -> Decision | None:
    """The reference model's decision for `req` when neither sampling nor the
    rate-limit buckets' state change its kind or status (None: they decide it)."""
    low = decide_datapath(plan, listener, req, _Extreme(False), _Dry())
    high = decide_datapath(plan, listener, req, _Extreme(True), State())
    return low if (low.kind, low.status) == (high.kind, high.status) else None


def _sure_reply(plan: KernelPlan, listener: str, req: Request) -> int | None:
    """The status of a reply the kernel gives `req` whatever it samples, else None."""
    d = _sure(plan, listener, req)
    return d.status if d is not None and d.kind == "reply" else None


def _expect(d: Decision) -> str:
    if d.kind == "forward":
        return f"forward {d.cluster}"
    if d.kind == "reply":
        return f"reply {d.status}"
    return f"envoy: {d.reason}"


def _host(lp: ListenerPlan, vh: VirtualHost) -> str | None:
    """A Host value the listener's virtual-host selection gives to `vh`."""
    for d in sorted(vh.domains, key=lambda d: ("*" in d, d.count(":"))):
        host = d.replace("*", FILLER) if d != "*" else (
            f"{lp.address}:{lp.port}" if lp.address not in ("", "0.0.0.0", "::") else FILLER)
        if select_vhost(lp.virtual_hosts, host) is vh:
            return host
    return None


def _unsendable(m: RouteMatch) -> str:
    """Why the audit derives no request for matcher `m` ("" when it does)."""
    names = sorted({h.name for h in m.headers if h.name in _UNSENDABLE})
    return f"a {'/'.join(names)} header matcher: the audit does not derive its value" if names else ""


def _requests(m: RouteMatch, host: str, src_ip: str, port: int) -> Iterator[Request]:
    """Candidate requests for matcher `m`, the likeliest first (bounded). A value
    for an `:authority`/`host` matcher becomes the request's Host (the virtual
    host then chosen is checked by the caller); none for `_unsendable` ones."""
    if _unsendable(m):
        return
    header_sets = list(itertools.islice(_header_sets(m.headers), _MAX_CANDIDATES))
    queries = list(itertools.islice(_queries(m), _MAX_CANDIDATES))
    for path in _paths(m):
        for q in queries:
            for hs in header_sets:
                method = next((v for n, v in hs if n == ":method"), m.method or "GET")
                authority = next((v for n, v in hs if n in _HOST_NAMES), host)
                lines = tuple((n, v) for n, v in hs if n != ":method" and n not in _HOST_NAMES)
                yield Request(method, path + q, authority, lines, src_ip, port)


def _paths(m: RouteMatch) -> list[str]:
    p = m.path
    if m.path_kind is PathKind.PREFIX:
        base = p or "/"
        return [base, (base if base.endswith("/") else base + "/") + FILLER, base + FILLER]
    if m.path_kind is PathKind.EXACT:
        return [p]
    if m.path_kind is PathKind.PATH_SEPARATED_PREFIX:
        return [p, p + "/" + FILLER]
    if m.regex_literal is not None:
        return [m.regex_literal]
    if m.regex_prefix is not None:
        return [m.regex_prefix, m.regex_prefix + FILLER]
    if m.regex_dfa is not None:
        return dfa_examples(m.regex_dfa, _PATH_BYTES)
    return []


def _header_sets(hms: tuple[HeaderMatch, ...]) -> Iterator[tuple[tuple[str, str], ...]]:
    """Header lines (name, value) satisfying every matcher; None values are left out."""
    per = [[(h.name, v) for v in _header_values(h)] for h in hms]
    for combo in itertools.product(*per):
        yield tuple((n, v) for n, v in combo if v is not None)


def _header_values(h: HeaderMatch) -> list[str | None]:
    """Values of header `h` (None: not sent) that satisfy it, as the reference model says."""
    cands: list[str | None] = [None, "1", FILLER, ""]
    if h.match is not None:
        cands = _string_values(h.match) + cands
    return [v for v in cands if header_matches(h, _one_header(h.name, v))][:2]


def _one_header(name: str, value: str | None) -> Request:
    if name == ":method":  # the reference model reads it from Request.method
        return Request(value or "GET", "/", FILLER)
    if name in _HOST_NAMES:  # and these from Request.host (a request always has one)
        return Request("GET", "/", FILLER if value is None else value)
    return Request("GET", "/", FILLER, () if value is None else ((name, value),))


def _string_values(sm: StringMatch) -> list[str | None]:
    if sm.kind is StringKind.REGEX:
        try:
            return list(dfa_examples(compile_dfa(sm.value), _VALUE_BYTES))
        except RegexUnsupported:
            return []
    if sm.kind is StringKind.PREFIX:
        return [sm.value, sm.value + FILLER]
    if sm.kind is StringKind.SUFFIX:
        return [sm.value, FILLER + sm.value]
    return [sm.value, "1"]


def _queries(m: RouteMatch) -> Iterator[str]:
    if not m.query_params:
        yield ""
        return
    per = []
    for q in m.query_params:
        vals = [None] if q.match is None else _string_values(q.match) + ["1"]
        ok = [v for v in vals if q.match is None or (
            v is not None and set(v) <= _QUERY_VALUE_BYTES and string_matches(q.match, v))]
        per.append([(q.name, v) for v in ok[:2]])
    for combo in itertools.product(*per):
        yield "?" + "&".join(n if v is None else f"{n}={v}" for n, v in combo)


def dfa_examples(dfa: RegexDfa, alphabet: list[int], limit: int = 3,
                 max_len: int = 96) -> list[str]:
    """Up to `limit` short strings over `alphabet` (byte values) the DFA accepts in
    full, shortest first (breadth-first over states; one byte per class)."""
    reps: dict[int, int] = {}
    for b in alphabet:
        if b < len(dfa.classes):
            reps.setdefault(dfa.classes[b], b)
    out: list[str] = []
    seen = {0}
    todo: deque[tuple[int, str]] = deque([(0, "")])
    while todo and len(out) < limit:
        state, text = todo.popleft()
        if dfa.accepting[state]:
            out.append(text)
        if len(text) >= max_len:
            continue
        for cls, b in sorted(reps.items(), key=lambda kv: kv[1]):
            nxt = dfa.transitions[state * dfa.n_classes + cls]
            if nxt >= 0 and nxt not in seen:
                seen.add(nxt)
                todo.append((nxt, text + chr(b)))
    return out
