"""Envoy ``RouteAction.regex_rewrite`` -> the path rewrite the kernel does exactly.

Called by `fastpath.classify_route` for a route with ``regexRewrite``; the
result (`plan.PathRewrite`) is read by the reference model
(`fastpath.reference`) and the synthesis (`fastpath.synth_tables`). Owned by
the split.

What Envoy 1.40 does (seen with the real binary, tests/split/test_rewrite_envoy.py):
the pattern is applied to the path without its query string, which is put
back after the result; every non-overlapping match is replaced (RE2
GlobalReplace: ``.*`` unanchored replaces "/a/b" once, the empty match at the
end is not taken); ``\\0``..``\\9`` in the substitution are the groups; a path
the pattern does not match is left as is; case counts; percent-encoded bytes
are matched as written (no decoding). Whenever the route has a regex_rewrite,
Envoy adds ``x-envoy-original-path`` (the request's path and query) as the last
header line (or overwrites a client's one in place), also when the pattern did
not match; when the result is empty, Envoy keeps the path and adds no header.
That holds when the router does not set ``suppress_envoy_headers``: with it
Envoy sends no x-envoy-original-path, and `fastpath.classify_route`
(`_regex_rewrite`) leaves such rewrites to Envoy ("path rewrite with the
router's suppress_envoy_headers").

The kernel forms (everything else is ENVOY with a reason naming the pattern):

* **whole path -> constant**: a pattern that matches every path it is given
  as a whole, once (``.*``, ``^.*$``, ``/.*`` (istiod's Gateway API
  ReplaceFullPath), ``^/.*$``), or ``^LIT.*$?``. The substitution is a constant.
* **literal prefix -> constant, rest kept**: ``^LIT`` or ``^LIT(.*)$?`` with
  the substitution ``NEW`` or ``NEW\\1``.

When the route's matcher does not guarantee the literal (a case-sensitive
prefix / exact / path-separated-prefix match whose string starts with LIT),
the kernel compares the path's first bytes with it (``PathRewrite.check``) and
leaves a path that does not start with it as is, as Envoy does.

The constant must be non-empty (an empty result is Envoy's special case) and
made of bytes the kernel writes into a request line unchanged (no space,
control byte, ``?`` or ``#``).
"""

from __future__ import annotations

import re._constants as _C  # noqa: N814  (sre opcodes, as fastpath.classify_match)
import re._parser as sre
from typing import Any

from fastpath.plan import PathKind, PathRewrite, RouteMatch

Reasons = list[str]

# Bytes a constant may hold: the reference model's safe path bytes (what the
# kernel forwards unescaped) without '?' (it would start a second query).
CONST_BYTES = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/=&+:@!$'()*,;")
MAX_VALUE = 64  # bytes of the constant the kernel writes (one l7fp_hdradds blob, with room)
ORIGINAL_PATH = "x-envoy-original-path"


def path_rewrite(rr: dict[str, Any], match: RouteMatch) -> tuple[PathRewrite | None, Reasons]:
    """(PathRewrite, []) when the kernel produces Envoy's result for every
    request the route takes, else (None, [reason naming the pattern])."""
    pattern = str((rr.get("pattern") or {}).get("regex", ""))
    sub = str(rr.get("substitution", ""))
    what = f"regex_rewrite {pattern!r} -> {sub!r}"
    shape = _shape(pattern)
    if shape is None:
        return None, [f"{what}: not a whole-path or literal-prefix pattern"]
    lit, rest = shape
    value, group = _substitution(sub)
    if value is None:
        return None, [f"{what}: substitution uses groups other than a final \\1"]
    if group and rest != "group":
        return None, [f"{what}: \\1 without a (.*) group after a literal"]
    if not _writable(value):
        return None, [f"{what}: constant empty, longer than {MAX_VALUE} or with bytes "
                      "the kernel does not write"]
    if lit is None:
        return PathRewrite(value, None, "", pattern, sub), []
    # a literal the route's matcher does not guarantee is compared by the kernel
    check = "" if _guaranteed(match, lit) else lit
    if len(check) > MAX_VALUE:
        return None, [f"{what}: literal longer than {MAX_VALUE} bytes"]
    if rest and not group:
        return PathRewrite(value, None, check, pattern, sub), []  # ^LIT.*$: the whole path
    return PathRewrite(value, len(lit), check, pattern, sub), []


def _writable(value: str) -> bool:
    """A constant the kernel writes into the path: 1..MAX_VALUE unreserved bytes."""
    return bool(value) and len(value) <= MAX_VALUE and all(c in CONST_BYTES for c in value)


def prefix_rewrite(m: RouteMatch, value: str) -> PathRewrite | None:
    """A route's prefix_rewrite as the kernel does it: a prefix (or
    path-separated prefix) match's matched bytes, or the whole path of an
    exact or regex match, replaced by ``value`` (Envoy 1.40, the same
    x-envoy-original-path; tests/split/test_rewrite_envoy.py). None when the
    kernel cannot write ``value`` (empty: Envoy does not rewrite at all)."""
    if not _writable(value):
        return None
    if m.path_kind in (PathKind.PREFIX, PathKind.PATH_SEPARATED_PREFIX):
        return PathRewrite(value, len(m.path))
    return PathRewrite(value, None)


def _shape(pattern: str) -> tuple[str | None, str] | None:
    """(None, "dot"): matches every path whole; (LIT, rest): ``^LIT`` followed
    by ``(.*)`` (rest "group"), ``.*`` ("dot") or nothing (""); None: another
    pattern."""
    if "(?" in pattern or "\\A" in pattern or "\\z" in pattern:
        return None
    try:
        items = list(sre.parse(pattern))
    except Exception:
        return None
    anchored = bool(items) and items[0] == (_C.AT, _C.AT_BEGINNING)
    items = items[1:] if anchored else items
    if items and items[-1] == (_C.AT, _C.AT_END):
        items = items[:-1]
        if not items or not _dot_star(items[-1], group_ok=True):
            return None  # "$" only after a final .* (else the rest must be empty)
    if _whole(items):
        return None, "dot"
    if not anchored:
        return None
    rest = ""
    if items and _dot_star(items[-1], group_ok=True):
        rest = "group" if items[-1][0] is _C.SUBPATTERN else "dot"
    lits = items[:-1] if rest else items
    if not lits or not all(op is _C.LITERAL and v < 128 for op, v in lits):
        return None
    text = "".join(chr(v) for _, v in lits)
    return (text, rest) if all(c in CONST_BYTES for c in text) else None


def _whole(items: list[Any]) -> bool:
    """``.*`` or ``/.*`` (not a group): one match covering a path, which
    always starts with '/' (the kernel takes origin-form targets only)."""
    if len(items) == 1:
        return _dot_star(items[0], group_ok=False)
    return len(items) == 2 and items[0] == (_C.LITERAL, ord("/")) and _dot_star(items[1], group_ok=False)


def _dot_star(item: Any, group_ok: bool) -> bool:
    """``.*`` greedy, or (``group_ok``) the first group ``(.*)``."""
    op, av = item
    if op is _C.SUBPATTERN and group_ok:
        group, _, _, body = av
        return group == 1 and len(body) == 1 and _dot_star(body[0], group_ok=False)
    return op is _C.MAX_REPEAT and av[0] == 0 and av[1] is _C.MAXREPEAT \
        and list(av[2]) == [(_C.ANY, None)]


def _substitution(sub: str) -> tuple[str | None, bool]:
    """(constant, ends with \\1) of an RE2 rewrite string; (None, False) when
    it refers to another group (or \\0) or has a \\1 elsewhere."""
    out, i, group = [], 0, False
    while i < len(sub):
        ch = sub[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = sub[i + 1: i + 2]
        if nxt == "\\":
            out.append("\\")
        elif nxt == "1" and i + 2 == len(sub):
            group = True
        else:
            return None, False
        i += 2
    return "".join(out), group


def _guaranteed(m: RouteMatch, lit: str) -> bool:
    """Every path the route's matcher takes starts with ``lit`` (case counts)."""
    known = m.literal_path()
    return known is not None and known[1].startswith(lit)


def rewritten(rw: PathRewrite, path: str) -> str:
    """The path (and query) Envoy sends upstream for the request path ``path``
    (with its query) on a route with ``rw`` (the reference model's)."""
    p, sep, query = path.partition("?")
    if not p.startswith(rw.check):
        return path  # the pattern does not match: Envoy leaves the path as is
    cut = len(p) if rw.cut is None else rw.cut
    return rw.value + p[cut:] + sep + query
