"""DFA tables of the kernel decision (bpf_src/include/l7fp_dfa.h).

Called by fastpath.synth_tables for path regex routes and for header
`contains` / `safe_regex` matchers; owned by the decision engine (K1).
A header matcher becomes one full-match automaton over the value:
``contains s`` is ``.*s.*`` (with ``[xX]`` for each letter under
ignore_case, Envoy lower-cases ASCII only), ``safe_regex r`` is ``r`` (Envoy's
header regex matches the whole value; ignore_case has no effect on it).
Bytes >= 128 are outside every automaton's alphabet: the kernel hands such a
request to Envoy (RE2 reads them as UTF-8).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from fastpath.plan import RegexDfa, StringKind, StringMatch
from fastpath.regex_dfa import ALPHABET, MAX_STATES, RegexUnsupported, compile_dfa

MAX_CLASSES = 32  # L7FP_DFA_CLASSES
DEAD = 0xFF  # L7FP_DFA_DEAD
OUTSIDE = 0xFF  # a byte class >= MAX_CLASSES: undecidable in the kernel
PATH_DFA = 4  # L7FP_PATH_DFA: route path_kind, path.len is the DFA index
SM_DFA = 5  # L7FP_SM_DFA: header matcher kind, v.len is the DFA index


class DfaPunt(ValueError):
    """The matcher has no automaton the kernel table holds."""


@dataclass(frozen=True)
class DfaRef:
    """A table string field that carries a DFA index in its `len` (see l7fp_dfa.h)."""

    index: int


def header_dfa(sm: StringMatch) -> RegexDfa:
    """The full-match automaton of a contains / safe_regex header matcher (or RBAC
    url_path matcher, over the path without the query)."""
    if sm.kind is StringKind.CONTAINS:
        pattern = ".*" + "".join(_lit(ch, sm.ignore_case) for ch in sm.value) + ".*"
    elif sm.kind is StringKind.REGEX:
        pattern = sm.value
    else:
        raise DfaPunt(f"header matcher kind {sm.kind.value} has no automaton")
    if any(ord(ch) >= ALPHABET for ch in sm.value):
        raise DfaPunt("non-ASCII matcher value")
    try:
        return compile_dfa(pattern)
    except RegexUnsupported as e:
        raise DfaPunt(f"header {sm.kind.value} {sm.value!r}: {e}") from e


def _lit(ch: str, ignore_case: bool) -> str:
    if ignore_case and ch.isascii() and ch.isalpha():
        return f"[{ch.lower()}{ch.upper()}]"
    return re.escape(ch)


def encode(dfa: RegexDfa) -> bytes:
    """struct l7fp_dfa: accept bits, 256 byte classes, next-state table."""
    if dfa.n_classes > MAX_CLASSES:
        raise DfaPunt(f"regex with more than {MAX_CLASSES} byte classes")
    n_states = len(dfa.accepting)
    if n_states > MAX_STATES:
        raise DfaPunt(f"regex with more than {MAX_STATES} states")
    accept = sum(1 << s for s, a in enumerate(dfa.accepting) if a)
    cls = bytes(dfa.classes) + bytes([OUTSIDE] * (256 - ALPHABET))
    nxt = bytearray([DEAD] * (MAX_STATES * MAX_CLASSES))
    for s in range(n_states):
        for c in range(dfa.n_classes):
            t = dfa.transitions[s * dfa.n_classes + c]
            nxt[s * MAX_CLASSES + c] = DEAD if t < 0 else t
    return struct.pack("<Q", accept) + cls + bytes(nxt)


def walk(table: bytes, data: bytes) -> bool | None:
    """The C walk (l7fp_dfa_match) over an encoded table, for unit tests."""
    accept = struct.unpack_from("<Q", table)[0]
    cls, nxt = table[8:264], table[264:]
    state = 0
    for b in data:
        if cls[b] >= MAX_CLASSES:
            return None
        state = nxt[state * MAX_CLASSES + cls[b]]
        if state == DEAD:
            return False
    return bool(accept >> state & 1)
