"""Requests derived from a plan's routes and RBAC policies, for the corpus
differentials: tests/split/test_corpus_differential.py sends them to Envoy,
tests/kernel_decide/test_corpus_differential.py runs them through l7fp_decide
(`listener_requests`: those of one listener).

For one KERNEL route: a request its matcher takes (a host of its virtual
host's domains, a path its matcher takes, the headers, query parameters and
method it requires) and near misses of each part (other method, header absent
or with another value, path one segment off, path or value in another case, a
CORS preflight). For one RBAC policy: a request per permission group that its
permissions take, and near misses. Which of them the kernel decides, and what
it decides, is the reference model's business: these only aim at the edges of
each matcher.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from fastpath.plan import (
    HeaderMatch,
    ListenerPlan,
    PathKind,
    Permission,
    RegexDfa,
    Route,
    StringKind,
    StringMatch,
    Verdict,
    VirtualHost,
)
from fastpath.reference import Request
from fastpath.regex_dfa import RegexUnsupported, compile_dfa

OTHER = "l7fp-other"
# bytes tried, in order, when walking a DFA for a string it accepts
_ALPHABET = "/abcxyz0129-._ABCXYZ"


def dfa_example(dfa: RegexDfa, start: str = "") -> str | None:
    """The shortest string over _ALPHABET (after `start`'s bytes) the DFA accepts."""
    def step(state: int, ch: str) -> int:
        return dfa.transitions[state * dfa.n_classes + dfa.classes[ord(ch)]]

    state = 0
    for ch in start:
        state = step(state, ch)
        if state < 0:
            return None
    seen, todo = {state}, deque([(state, start)])
    while todo:
        state, text = todo.popleft()
        if dfa.accepting[state]:
            return text
        for ch in _ALPHABET:
            nxt = step(state, ch)
            if nxt >= 0 and nxt not in seen:
                seen.add(nxt)
                todo.append((nxt, text + ch))
    return None


def host_of(vh: VirtualHost) -> str:
    """A Host header the virtual host's domains take: the first exact domain, else
    a name its first wildcard domain takes."""
    exact = [d for d in vh.domains if "*" not in d]
    if exact:
        return exact[0]
    d = vh.domains[0] if vh.domains else "*"
    if d == "*":
        return "l7fp-any.test"
    return "l7fp." + d[2:] if d.startswith("*.") else d.replace("*", "l7fp")


def string_example(sm: StringMatch | None) -> str:
    """A value `sm` takes."""
    if sm is None or sm.kind is StringKind.PRESENT:
        return "1"
    if sm.kind is StringKind.REGEX:
        try:
            return dfa_example(compile_dfa(sm.value)) or "1"
        except RegexUnsupported:
            return "1"
    return {StringKind.EXACT: sm.value, StringKind.PREFIX: sm.value + "x",
            StringKind.SUFFIX: "x" + sm.value, StringKind.CONTAINS: "x" + sm.value + "x"}[sm.kind]


def swapped(text: str) -> str:
    return text.swapcase()


def path_examples(r: Route) -> tuple[str, list[str]]:
    """(a path the route's matcher takes, near misses)."""
    m = r.match
    kind = m.path_kind
    if kind is PathKind.REGEX:
        if m.regex_literal is not None:
            hit = m.regex_literal
        elif m.regex_prefix is not None:
            hit = m.regex_prefix + "x"
        else:
            hit = (dfa_example(m.regex_dfa) if m.regex_dfa else None) or "/"
    elif kind is PathKind.PREFIX:
        hit = (m.path or "/") + ("" if m.path.endswith("/") else "/x")
    else:  # EXACT, PATH_SEPARATED_PREFIX
        hit = m.path or "/"
    stem = hit.rstrip("/")
    misses = [stem[: stem.rfind("/")] + "/l7fp" if "/" in stem else "/l7fp",  # a segment off
              hit + "x", swapped(hit)]
    if kind is PathKind.PATH_SEPARATED_PREFIX:
        misses += [hit + "/x", hit + "x/y"]
    if kind is PathKind.PREFIX and len(m.path) > 1:
        misses.append(m.path[:-1])
    return hit, [p if p.startswith("/") else "/" + p for p in misses if p != hit]


def _header_value(h: HeaderMatch) -> str | None:
    """A value that satisfies `h` (None: leave the header out)."""
    if h.absent:
        return None if not h.invert else "1"
    if h.invert:
        return OTHER
    return string_example(h.match)


def _with_header(req: Request, name: str, value: str | None) -> Request:
    if name == ":method":  # OTHER, a lower-case method: methods the kernel's parser refuses
        return replace(req, method=value or "DELETE")
    if name in (":authority", "host"):
        return replace(req, host=value or req.host)
    if name == ":path":
        return req
    rest = tuple((k, v) for k, v in req.headers if k != name)
    return replace(req, headers=rest + (((name, value),) if value is not None else ()))


def _with_query(path: str, params: list[tuple[str, str]]) -> str:
    if not params:
        return path
    return path + "?" + "&".join(f"{k}={v}" for k, v in params)


def route_requests(vh: VirtualHost, r: Route, dst_port: int) -> list[Request]:
    """A request the route takes, then its near misses."""
    m = r.match
    host = host_of(vh)
    path, path_misses = path_examples(r)
    query = [(q.name, string_example(q.match) if q.match else "1") for q in m.query_params]
    method = m.method or "GET"
    hit = Request(method, _with_query(path, query), host, (), dst_port=dst_port)
    for h in m.headers:
        hit = _with_header(hit, h.name, _header_value(h))
    out = [hit, replace(hit, method="POST" if method != "POST" else "PUT"),
           replace(hit, host="l7fp-nomatch.test"),
           # a CORS preflight: Envoy's CORS filter answers it where a policy is in force
           replace(hit, method="OPTIONS", headers=hit.headers + (
               ("origin", "http://l7fp.test"), ("access-control-request-method", "GET")))]
    out += [replace(hit, path=_with_query(p, query)) for p in path_misses]
    if r.request_headers_to_remove:  # carrying what the route removes
        out.append(replace(hit, headers=hit.headers + tuple((n, "l7fp") for n in r.request_headers_to_remove)))
    for h in m.headers:
        if h.name in (":path", ":authority", "host"):
            continue
        value = _header_value(h)
        out.append(_with_header(hit, h.name, None if value is not None else OTHER))
        if value is not None:
            out.append(_with_header(hit, h.name, OTHER))
            if value.swapcase() != value:
                out.append(_with_header(hit, h.name, value.swapcase()))
    for i, (name, value) in enumerate(query):
        out.append(replace(hit, path=_with_query(path, query[:i] + query[i + 1:])))
        out.append(replace(hit, path=_with_query(path, query[:i] + [(name, value + "x")] + query[i + 1:])))
    return out


def permission_requests(group: tuple[Permission, ...], host: str, dst_port: int) -> list[Request]:
    """A request one permission group (an AND) takes, and a near miss per part."""
    hit = Request("GET", "/", host, (), dst_port=dst_port)
    for p in group:
        if p.method is not None:
            hit = replace(hit, method=p.method)
        if p.path is not None:
            value = string_example(p.path)
            hit = replace(hit, path=value if value.startswith("/") else "/" + value)
        for h in p.headers:
            hit = _with_header(hit, h.name, _header_value(h))
    out = [hit]
    for p in group:
        if p.method is not None:
            out.append(replace(hit, method="DELETE" if p.method != "DELETE" else "GET"))
        if p.path is not None:
            out += [replace(hit, path=x) for x in (hit.path + "x", swapped(hit.path), "/l7fp")]
        for h in p.headers:
            out += [_with_header(hit, h.name, None), _with_header(hit, h.name, OTHER)]
    return out


def listener_requests(lp: ListenerPlan, dst_port: int) -> list[Request]:
    """Each KERNEL route's requests (and each guard route's: the kernel must hand
    them to Envoy), a plain GET (an allow-nothing RBAC's 403), each RBAC policy's;
    once each, in that order, to destination port `dst_port`."""
    out = []
    for vh in lp.virtual_hosts:
        for r in vh.routes:
            if r.verdict is Verdict.KERNEL or r.guard:
                out += route_requests(vh, r, dst_port)
    host = host_of(lp.virtual_hosts[0]) if lp.virtual_hosts else "l7fp-any.test"
    out.append(Request("GET", "/", host, (), dst_port=dst_port))
    for rb in lp.rbacs:
        for pol in rb.policies:
            for group in pol.permissions:
                out += permission_requests(group, host, dst_port)
    return list(dict.fromkeys(out))
