"""Route matchers (proto-JSON) -> plan matchers, with the reason when the kernel can't.

Called by `fastpath.classify_route` and `fastpath.classify_rbac`; owned by the
split. Every function returns ``(ir, reasons)``: ``reasons`` is empty when the
kernel can evaluate the matcher exactly as Envoy does.
"""

from __future__ import annotations

import re._constants as _C
import re._parser as sre  # the stdlib regex parser: enough to spot literal regexes
from typing import Any

from fastpath.hop import MATCH_AFTER_REMOVAL
from fastpath.plan import (
    HeaderMatch,
    PathKind,
    QueryParamMatch,
    RegexDfa,
    RouteMatch,
    StringKind,
    StringMatch,
)
from fastpath.regex_dfa import RegexUnsupported, compile_dfa  # noqa: E402

Reasons = list[str]


def regex_shape(pattern: str) -> tuple[str, str] | None:
    """The plain string match a full-match regex is equivalent to, if any:
    ("literal", s) for ``s``, ("prefix", s) for ``s.*``, ("suffix", s) for
    ``.*s``, ("contains", s) for ``.*s.*``; None otherwise.

    Envoy's safe_regex is RE2 with full-match semantics; ``.`` never matches a
    newline, which neither paths nor header values contain.
    """
    if "(?" in pattern:
        return None  # inline flags ((?i) changes the meaning of every literal) or groups
    try:
        items = list(sre.parse(pattern))
    except Exception:
        return None
    if items and items[0] == (_C.AT, _C.AT_BEGINNING):
        items = items[1:]
    if items and items[-1] == (_C.AT, _C.AT_END):
        items = items[:-1]
    tail = bool(items) and _is_dot_star(items[-1])
    if tail:
        items = items[:-1]
    head = bool(items) and _is_dot_star(items[0])
    if head:
        items = items[1:]
    if not all(op is _C.LITERAL for op, _ in items):
        return None
    text = "".join(chr(v) for _, v in items)
    if "\n" in text:
        return None
    kind = {(False, False): "literal", (False, True): "prefix", (True, False): "suffix",
            (True, True): "contains"}[(head, tail)]
    return kind, text


def _is_dot_star(item: Any) -> bool:
    op, av = item
    return op is _C.MAX_REPEAT and av[0] == 0 and av[1] is _C.MAXREPEAT \
        and list(av[2]) == [(_C.ANY, None)]


def string_match(m: dict[str, Any], what: str) -> tuple[StringMatch | None, Reasons]:
    """Envoy StringMatcher -> StringMatch. A literal regex becomes EXACT/PREFIX."""
    ic = bool(m.get("ignoreCase", False))
    for key, kind in (("exact", StringKind.EXACT), ("prefix", StringKind.PREFIX),
                      ("suffix", StringKind.SUFFIX), ("contains", StringKind.CONTAINS)):
        if key in m:
            return StringMatch(kind, m[key], ic), []
    if "safeRegex" in m:
        return _regex_match(m["safeRegex"].get("regex", ""), ic, what)
    return None, [f"{what}: matcher {sorted(m)} not supported in the kernel"]


def _regex_match(pattern: str, ic: bool, what: str) -> tuple[StringMatch | None, Reasons]:
    shape = regex_shape(pattern)
    if shape is None:
        try:  # the kernel walks it as a DFA (fastpath.synth_dfa); Envoy's header
            compile_dfa(pattern)  # regex is a full match of the value, like a path regex
        except RegexUnsupported as e:
            return StringMatch(StringKind.REGEX, pattern, ic), [
                f"{what}: regex not literal and no small DFA ({e}): {pattern!r}"]
        return StringMatch(StringKind.REGEX, pattern, ic), []
    kind = {"literal": StringKind.EXACT, "prefix": StringKind.PREFIX, "suffix": StringKind.SUFFIX,
            "contains": StringKind.CONTAINS}[shape[0]]
    return StringMatch(kind, shape[1], ic), []


def header_match(h: dict[str, Any], what: str = "header") -> tuple[HeaderMatch, Reasons]:
    """Envoy HeaderMatcher -> HeaderMatch."""
    name = str(h.get("name", "")).lower()
    invert = bool(h.get("invertMatch", False))
    tmae = bool(h.get("treatMissingHeaderAsEmpty", False))
    where = f"{what} {name!r}"
    reasons: Reasons = []
    match: StringMatch | None = None
    absent = False
    if "presentMatch" in h:
        absent = not h["presentMatch"]
    elif "stringMatch" in h:
        match, reasons = string_match(h["stringMatch"], where)
    elif "exactMatch" in h:
        match = StringMatch(StringKind.EXACT, h["exactMatch"])
    elif "prefixMatch" in h:
        match = StringMatch(StringKind.PREFIX, h["prefixMatch"])
    elif "suffixMatch" in h:
        match = StringMatch(StringKind.SUFFIX, h["suffixMatch"])
    elif "containsMatch" in h:
        match = StringMatch(StringKind.CONTAINS, h["containsMatch"])
    elif "safeRegexMatch" in h:
        match, reasons = _regex_match(h["safeRegexMatch"].get("regex", ""), False, where)
    elif "rangeMatch" in h:
        reasons = [f"{where}: range_match"]
    if tmae:
        reasons.append(f"{where}: treat_missing_header_as_empty")
    if name in MATCH_AFTER_REMOVAL:  # Envoy matches after removing it, the kernel before
        reasons.append(f"{where}: hop-by-hop header")
    if name in ("cookie",) or name.startswith(":") and name not in (":method", ":authority", ":path"):
        reasons.append(f"{where}: pseudo/merged header")
    return HeaderMatch(name, match, invert, absent, tmae, evaluable=not reasons), reasons


def query_match(q: dict[str, Any]) -> tuple[QueryParamMatch, Reasons]:
    name = str(q.get("name", ""))
    if q.get("presentMatch"):
        return QueryParamMatch(name), []
    if "stringMatch" in q:
        m, r = string_match(q["stringMatch"], f"query parameter {name!r}")
        return QueryParamMatch(name, m, evaluable=not r), r
    return QueryParamMatch(name, evaluable=False), [f"query parameter {name!r}: matcher not supported"]


_IGNORED_MATCH = {"prefix", "path", "safeRegex", "pathSeparatedPrefix", "caseSensitive",
                  "headers", "queryParameters", "grpc"}


def route_match(m: dict[str, Any]) -> tuple[RouteMatch, Reasons]:
    """Envoy RouteMatch -> RouteMatch."""
    reasons: Reasons = []
    cs = bool(m.get("caseSensitive", True))
    kind, path, lit, pre = PathKind.PREFIX, "/", None, None
    dfa: RegexDfa | None = None
    if "prefix" in m:
        path = m["prefix"]
    elif "path" in m:
        kind, path = PathKind.EXACT, m["path"]
    elif "pathSeparatedPrefix" in m:
        kind, path = PathKind.PATH_SEPARATED_PREFIX, m["pathSeparatedPrefix"]
    elif "safeRegex" in m:
        kind, path = PathKind.REGEX, m["safeRegex"].get("regex", "")
        shape = regex_shape(path)
        if shape is None or shape[0] in ("suffix", "contains"):
            try:
                dfa = compile_dfa(path)
            except RegexUnsupported as e:
                reasons.append(f"path regex not literal and no small DFA ({e}): {path!r}")
        elif shape[0] == "literal":
            lit = shape[1]
        else:
            pre = shape[1]
    headers, method = [], None
    for h in m.get("headers", []):
        hm, r = header_match(h)
        reasons += r
        headers.append(hm)
        if hm.name == ":method" and hm.match and hm.match.kind is StringKind.EXACT and not hm.invert:
            method = hm.match.value
    queries = []
    for q in m.get("queryParameters", []):
        qm, r = query_match(q)
        reasons += r
        queries.append(qm)
    unmodelled = tuple(sorted(set(m) - _IGNORED_MATCH))
    for key in unmodelled:
        reasons.append(f"route match {key}")
    if "grpc" in m:  # it only matches gRPC requests, and the kernel hands every one to Envoy
        reasons.append("route match grpc (gRPC requests go to Envoy)")
    rm = RouteMatch(kind, path, cs, tuple(headers), tuple(queries), method, lit, pre,
                    grpc="grpc" in m, regex_dfa=dfa, unmodelled=unmodelled)
    return rm, reasons
