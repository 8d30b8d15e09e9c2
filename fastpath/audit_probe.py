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
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

from fastpath.plan import (
    Direction,
    HeaderMatch,
    KernelPlan,
    ListenerPlan,
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
    QueryUndecidable,
    Request,
    decide_datapath,
    header_matches,
    route_matches,
    select_vhost,
    string_matches,
)
from fastpath.regex_dfa import RegexUnsupported, compile_dfa
from fastpath.rewrite import CONST_BYTES

FILLER = "l7fp-audit"  # what a probe puts where the matcher allows anything
# Bytes a derived path may use: what the kernel matches without normalisation.
_PATH_BYTES = sorted(ord(c) for c in CONST_BYTES)
_VALUE_BYTES = list(range(0x21, 0x7F))  # a header or query value: visible ASCII
_MAX_CANDIDATES = 64  # header/query value combinations tried per route


@dataclass(frozen=True)
class Probe:
    """One KERNEL route and the request that exercises it (None: skipped, `skip` says why).

    `expect` is the reference model's decision for that request on the node's
    own plan (`forward CLUSTER`, `reply STATUS`, `envoy: REASON`); the
    destination's inbound side is not in it (the agent merges that later)."""

    listener: str
    vhost: str
    route: str
    address: str
    port: int
    request: Request | None
    skip: str = ""
    expect: str = ""

    @property
    def full_name(self) -> str:
        """The route's name in the fast path's counters (fastpath.synth_tables)."""
        return f"{self.listener}/{self.vhost}/{self.route}"


def probes(plan: KernelPlan, src_ip: str = "127.0.0.1") -> list[Probe]:
    """One Probe per KERNEL route (guards left out) of the plan's listeners, in plan order.

    Routes of inbound listeners are skipped: their requests arrive from other
    pods and are decided in the callers' kernels (fastpath.inbound_merge)."""
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
    first: Probe | None = None
    shadow = ""
    for req in _requests(r.match, host, src_ip, lp.port):
        try:
            chosen = _first_route(lp, req)
        except QueryUndecidable as exc:
            shadow = shadow or str(exc)
            continue
        if chosen is not r:
            shadow = shadow or (f"shadowed by route {chosen.name!r}" if chosen is not None
                                else "the reference model matches no route")
            continue
        d = decide_datapath(plan, lp.name, req)
        p = replace(base, request=req, expect=_expect(d))
        if d.kind != "envoy":
            return p
        first = first or p  # keep looking for a request the kernel can take
    if first is not None:
        return first
    return _skipped(base, shadow or "no request matches the route's matcher")


def _skipped(p: Probe, why: str) -> Probe:
    return replace(p, request=None, skip=why)


def _expect(d: object) -> str:
    kind, status = getattr(d, "kind", ""), getattr(d, "status", 0)
    if kind == "forward":
        return f"forward {getattr(d, 'cluster', '')}"
    if kind == "reply":
        return f"reply {status}"
    return f"envoy: {getattr(d, 'reason', '')}"


def _first_route(lp: ListenerPlan, req: Request) -> Route | None:
    vh = select_vhost(lp.virtual_hosts, req.host)
    if vh is None:
        return None
    return next((x for x in vh.routes if route_matches(x.match, req)), None)


def _host(lp: ListenerPlan, vh: VirtualHost) -> str | None:
    """A Host value the listener's virtual-host selection gives to `vh`."""
    for d in sorted(vh.domains, key=lambda d: ("*" in d, d.count(":"))):
        host = d.replace("*", FILLER) if d != "*" else (
            f"{lp.address}:{lp.port}" if lp.address not in ("", "0.0.0.0", "::") else FILLER)
        if select_vhost(lp.virtual_hosts, host) is vh:
            return host
    return None


def _requests(m: RouteMatch, host: str, src_ip: str, port: int) -> Iterator[Request]:
    """Candidate requests for matcher `m`, the likeliest first (bounded)."""
    header_sets = list(itertools.islice(_header_sets(m.headers), _MAX_CANDIDATES))
    queries = list(itertools.islice(_queries(m), _MAX_CANDIDATES))
    for path in _paths(m):
        for q in queries:
            for hs in header_sets:
                method = next((v for n, v in hs if n == ":method"), m.method or "GET")
                lines = tuple((n, v) for n, v in hs if n != ":method")
                yield Request(method, path + q, host, lines, src_ip, port)


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
        ok = [v for v in vals if q.match is None or (v is not None and string_matches(q.match, v))]
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
