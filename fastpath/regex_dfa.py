"""Compile a route regex to a small DFA over ASCII, or say why not.

Called by `fastpath.classify_match` for `safe_regex` path matchers that are not
literals; the DFA goes into the plan (`RouteMatch.regex_dfa`) and the kernel
walks it over the path bytes (a bounded loop: one table lookup per byte).
Owned by the split.

Semantics: Envoy's safe_regex is RE2 with *full match* on the path without the
query. Patterns are parsed with Python's `re` parser, which reads the RE2
subset used in routes identically; anything with a different meaning or no DFA
(backreferences, lookaround, word boundaries, inline flags, anchors inside the
pattern) is refused. Paths the kernel matches are ASCII (the reference model
hands any other byte to Envoy), so the alphabet is 0..127.
"""

from __future__ import annotations

import re._constants as C
import re._parser as sre
from dataclasses import dataclass
from typing import Any

from fastpath.plan import RegexDfa

MAX_STATES = 64  # kernel table bound: states x byte classes entries
MAX_NFA = 2048
MAX_REPEAT_EXPANSION = 32
ALPHABET = 128


class RegexUnsupported(ValueError):
    """The pattern has no small DFA; the message says which construct."""


@dataclass
class _Nfa:
    """Thompson NFA: edges[state] = list of (symbol set or None for epsilon, target)."""

    edges: list[list[tuple[frozenset[int] | None, int]]]

    def new(self) -> int:
        if len(self.edges) >= MAX_NFA:
            raise RegexUnsupported("pattern too large")
        self.edges.append([])
        return len(self.edges) - 1

    def add(self, a: int, syms: frozenset[int] | None, b: int) -> None:
        self.edges[a].append((syms, b))


_ALL = frozenset(range(ALPHABET))
_DIGIT = frozenset(range(ord("0"), ord("9") + 1))
_WORD = _DIGIT | frozenset(range(ord("a"), ord("z") + 1)) | frozenset(range(ord("A"), ord("Z") + 1)) \
    | {ord("_")}
_SPACE = frozenset(b" \t\n\r\f\v")
_CATEGORIES = {C.CATEGORY_DIGIT: _DIGIT, C.CATEGORY_NOT_DIGIT: _ALL - _DIGIT,
               C.CATEGORY_WORD: _WORD, C.CATEGORY_NOT_WORD: _ALL - _WORD,
               C.CATEGORY_SPACE: _SPACE, C.CATEGORY_NOT_SPACE: _ALL - _SPACE}


def compile_dfa(pattern: str) -> RegexDfa:
    """The minimal-enough DFA of ``pattern`` (full match), or RegexUnsupported."""
    if "(?" in pattern:
        raise RegexUnsupported("inline flags or special groups")
    try:
        parsed = sre.parse(pattern)
    except Exception as e:
        raise RegexUnsupported(f"does not parse: {e}") from e
    items = list(parsed)
    if items and items[0] == (C.AT, C.AT_BEGINNING):
        items = items[1:]
    if items and items[-1] == (C.AT, C.AT_END):
        items = items[:-1]
    nfa = _Nfa([])
    start, end = nfa.new(), nfa.new()
    _seq(nfa, items, start, end)
    return _determinize(nfa, start, end)


def _seq(nfa: _Nfa, items: list[Any], a: int, b: int) -> None:
    cur = a
    for op, av in items:
        nxt = nfa.new()
        _item(nfa, op, av, cur, nxt)
        cur = nxt
    nfa.add(cur, None, b)


def _item(nfa: _Nfa, op: Any, av: Any, a: int, b: int) -> None:
    if op is C.LITERAL:
        nfa.add(a, _sym({av}), b)
    elif op is C.NOT_LITERAL:
        nfa.add(a, _ALL - {av}, b)
    elif op is C.ANY:
        nfa.add(a, _ALL - {ord("\n")}, b)
    elif op is C.IN:
        nfa.add(a, _charset(av), b)
    elif op is C.BRANCH:
        for alt in av[1]:
            _seq(nfa, list(alt), a, b)
    elif op is C.SUBPATTERN:
        _group, add_flags, del_flags, body = av
        if add_flags or del_flags:
            raise RegexUnsupported("group flags")
        _seq(nfa, list(body), a, b)
    elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
        _repeat(nfa, av, a, b)
    else:
        raise RegexUnsupported(f"construct {str(op).lower()}")


def _sym(codes: set[int]) -> frozenset[int]:
    if any(c >= ALPHABET for c in codes):
        raise RegexUnsupported("non-ASCII literal")
    return frozenset(codes)


def _charset(av: list[Any]) -> frozenset[int]:
    out: set[int] = set()
    negate = False
    for op, v in av:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            out.add(v)
        elif op is C.RANGE:
            out.update(range(v[0], min(v[1], ALPHABET - 1) + 1))
        elif op is C.CATEGORY and v in _CATEGORIES:
            out |= _CATEGORIES[v]
        else:
            raise RegexUnsupported(f"character class item {str(op).lower()}")
    out &= _ALL
    return frozenset(_ALL - out) if negate else frozenset(out)


def _repeat(nfa: _Nfa, av: Any, a: int, b: int) -> None:
    lo, hi, body = av
    body = list(body)
    unbounded = hi is C.MAXREPEAT
    if lo > MAX_REPEAT_EXPANSION or (not unbounded and hi > MAX_REPEAT_EXPANSION):
        raise RegexUnsupported("repeat count too large")
    cur = a
    for _ in range(lo):
        nxt = nfa.new()
        _seq(nfa, body, cur, nxt)
        cur = nxt
    if unbounded:
        loop = nfa.new()
        nfa.add(cur, None, loop)
        back = nfa.new()
        _seq(nfa, body, loop, back)
        nfa.add(back, None, loop)
        nfa.add(loop, None, b)
        return
    for _ in range(hi - lo):
        nfa.add(cur, None, b)
        nxt = nfa.new()
        _seq(nfa, body, cur, nxt)
        cur = nxt
    nfa.add(cur, None, b)


def _closure(nfa: _Nfa, states: frozenset[int]) -> frozenset[int]:
    stack, seen = list(states), set(states)
    while stack:
        s = stack.pop()
        for syms, t in nfa.edges[s]:
            if syms is None and t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


def _determinize(nfa: _Nfa, start: int, end: int) -> RegexDfa:
    # Byte classes: bytes that every NFA edge treats alike share a column.
    sets = {syms for edges in nfa.edges for syms, _ in edges if syms is not None}
    signature = [tuple(c in s for s in sorted(sets, key=sorted)) for c in range(ALPHABET)]
    class_ids: dict[tuple[bool, ...], int] = {}
    classes = tuple(class_ids.setdefault(sig, len(class_ids)) for sig in signature)
    reps = {cid: classes.index(cid) for cid in range(len(class_ids))}
    first = _closure(nfa, frozenset({start}))
    index = {first: 0}
    order = [first]
    table: list[int] = []
    i = 0
    while i < len(order):
        cur = order[i]
        for cid in range(len(class_ids)):
            byte = reps[cid]
            moved = frozenset(t for s in cur for syms, t in nfa.edges[s] if syms is not None and byte in syms)
            if not moved:
                table.append(-1)
                continue
            nxt = _closure(nfa, moved)
            if nxt not in index:
                if len(order) >= MAX_STATES:
                    raise RegexUnsupported(f"more than {MAX_STATES} DFA states")
                index[nxt] = len(order)
                order.append(nxt)
            table.append(index[nxt])
        i += 1
    accepting = tuple(end in s for s in order)
    return RegexDfa(classes=classes, n_classes=len(class_ids), transitions=tuple(table),
                    accepting=accepting)


def dfa_full_match(dfa: RegexDfa, text: str) -> bool | None:
    """Walk ``dfa`` over ``text``; None if a byte is outside the DFA's alphabet."""
    state = 0
    for ch in text.encode("utf-8", "surrogateescape"):
        if ch >= ALPHABET:
            return None
        state = dfa.transitions[state * dfa.n_classes + dfa.classes[ch]]
        if state < 0:
            return False
    return dfa.accepting[state]
