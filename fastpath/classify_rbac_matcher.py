"""The RBAC filter's `matcher` (xDS matcher tree, proto-JSON) -> plan.Rbac.

Called by `fastpath.classify_rbac.classify_rbac` when the filter has a
`matcher` (Envoy then ignores `rules`); owned by the split. Envoy 1.40's
semantics, checked with the real binary (tests/split/test_rbac_matcher.py):
the first entry of `matcher_list` whose predicate matches decides (its Action:
ALLOW, DENY, or LOG, which lets the request through); no entry matching takes
`on_no_match`, and without one the request is denied; an empty matcher denies
everything. A single predicate over a header that is absent is false (so its
`not_matcher` is true); several values of one header are matched joined by ",".

The plan's RBAC is one filter of OR-ed policies, each an AND of permission and
principal atoms, any atom possibly inverted. The first-match list becomes:

* every entry ALLOW and `on_no_match` DENY: an ALLOW filter of the entries;
* otherwise the predicate "denied" = OR over DENY entries i of (p_i and no
  earlier ALLOW entry matched), OR (on_no_match DENY and no ALLOW entry
  matched), brought to negation normal form (De Morgan down to atoms) and then
  to OR-of-AND groups: a DENY filter with one policy per group.

Inputs the kernel evaluates: request headers (HttpRequestHeaderMatchInput with
the string matchers of `classify_match.header_match`), the destination port
(exact) and the direct source address (exact IPv4). Anything else is a reason.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from fastpath.classify_match import Reasons, header_match
from fastpath.envoy_model import type_name
from fastpath.plan import Permission, Principal, Rbac, RbacPolicy, Verdict

MAX_GROUPS = 64  # as fastpath.classify_rbac: beyond it the policy stays in Envoy
Atom = Permission | Principal
# A formula in negation normal form: ("atom", Atom) | ("and"|"or", [formulas]) | ("const", bool)
Formula = tuple[str, Any]
_HEADER_INPUT = "envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
_NET = "envoy.extensions.matching.common_inputs.network.v3."
_RBAC_ACTION = "envoy.config.rbac.v3.Action"


def rbac_from_matcher(m: dict[str, Any]) -> tuple[Rbac | None, Reasons]:
    """The plan of an RBAC filter's `matcher`; None when it allows everything."""
    reasons: Reasons = []
    entries = []  # (name, allow, formula)
    if "matcherTree" in m:
        reasons.append("RBAC matcher: matcher_tree")
    for e in m.get("matcherList", {}).get("matchers", []):
        name, allow = _action(e.get("onMatch", {}), reasons)
        entries.append((name, allow, _predicate(e.get("predicate", {}), reasons)))
    default = _action(m["onNoMatch"], reasons)[1] if "onNoMatch" in m else False
    if reasons:
        return Rbac("ALLOW", (), Verdict.ENVOY, "; ".join(dict.fromkeys(reasons))), reasons
    if all(allow for _, allow, _ in entries) and not default:
        policies = [(name, g) for name, _, f in entries for g in _dnf(f, reasons)]
        return _rbac("ALLOW", policies, reasons)
    denied: list[tuple[str, Formula]] = []
    allows: list[Formula] = []
    for name, allow, f in entries:
        if allow:
            allows.append(f)
        else:
            denied.append((name, ("and", [f, *(_negate(a) for a in allows)])))
    if not default:
        denied.append(("on_no_match", ("and", [_negate(a) for a in allows])))
    policies = [(name, g) for name, f in denied for g in _dnf(f, reasons)]
    if not policies and not reasons:
        return None, []  # nothing is ever denied
    return _rbac("DENY", policies, reasons)


def _rbac(action: str, groups: list[tuple[str, list[Atom]]], reasons: Reasons) -> tuple[Rbac, Reasons]:
    if len(groups) > MAX_GROUPS:
        reasons.append(f"RBAC matcher: more than {MAX_GROUPS} alternatives")
    policies = tuple(_policy(f"{name}#{i}" if i else name, g)
                     for i, (name, g) in enumerate(groups[:MAX_GROUPS]))
    verdict = Verdict.ENVOY if reasons else Verdict.KERNEL
    return Rbac(action, policies, verdict, "; ".join(dict.fromkeys(reasons))), reasons


def _policy(name: str, group: list[Atom]) -> RbacPolicy:
    perms = tuple(a for a in group if isinstance(a, Permission)) or (Permission(any=True),)
    prins = tuple(a for a in group if isinstance(a, Principal)) or (Principal(any=True),)
    return RbacPolicy(name, (perms,), (prins,))


def _action(on_match: dict[str, Any], reasons: Reasons) -> tuple[str, bool]:
    """(name, allows) of an OnMatch; LOG lets the request through."""
    tc = on_match.get("action", {}).get("typedConfig", {})
    if on_match.get("keepMatching"):
        reasons.append("RBAC matcher: keep_matching")
    if "action" not in on_match or type_name(tc.get("@type", "")) != _RBAC_ACTION:
        kind = sorted(on_match)[0] if on_match else "(empty)"
        reasons.append(f"RBAC matcher: on_match {kind} {tc.get('@type', '')}".rstrip())
        return "", False
    return str(tc.get("name", "")), tc.get("action", "ALLOW") in ("ALLOW", "LOG")


def _predicate(p: dict[str, Any], reasons: Reasons) -> Formula:
    if "singlePredicate" in p:
        return _single(p["singlePredicate"], reasons)
    if "orMatcher" in p:
        return ("or", [_predicate(x, reasons) for x in p["orMatcher"].get("predicate", [])])
    if "andMatcher" in p:
        return ("and", [_predicate(x, reasons) for x in p["andMatcher"].get("predicate", [])])
    if "notMatcher" in p:
        return _negate(_predicate(p["notMatcher"], reasons))
    reasons.append(f"RBAC matcher: predicate {sorted(p)[0] if p else '(empty)'}")
    return ("const", False)


def _single(sp: dict[str, Any], reasons: Reasons) -> Formula:
    tc = sp.get("input", {}).get("typedConfig", {})
    kind = type_name(tc.get("@type", ""))
    if "valueMatch" not in sp:
        reasons.append(f"RBAC matcher: custom_match on {kind.rsplit('.', 1)[-1]}")
        return ("const", False)
    sm = sp["valueMatch"]
    if kind == _HEADER_INPUT:
        hm, more = header_match({"name": tc.get("headerName", ""), "stringMatch": sm}, "RBAC matcher header")
        reasons += more
        return ("atom", Permission(headers=(hm,)))
    exact = str(sm.get("exact", "")) if set(sm) == {"exact"} else None
    if kind == _NET + "DestinationPortInput" and exact is not None and exact.isdigit():
        return ("atom", Permission(port=int(exact)))
    if kind == _NET + "DirectSourceIPInput" and exact is not None and _ipv4(exact):
        return ("atom", Principal(source_cidr=f"{exact}/32"))
    if kind == _NET + "SourceIPInput":
        reasons.append("RBAC matcher: SourceIPInput (depends on x-forwarded-for)")
    else:
        reasons.append(f"RBAC matcher: input {kind.rsplit('.', 1)[-1] or '(none)'} {sorted(sm)}")
    return ("const", False)


def _ipv4(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).version == 4
    except ValueError:
        return False


def _negate(f: Formula) -> Formula:
    """not f, pushed down to the atoms (De Morgan); an atom's `invert` flips."""
    op, arg = f
    if op == "atom":
        return ("atom", _flip(arg))
    if op == "const":
        return ("const", not arg)
    return ("or" if op == "and" else "and", [_negate(x) for x in arg])


def _flip(a: Atom) -> Atom:
    if isinstance(a, Permission):
        return Permission(a.any, a.path, a.method, a.headers, a.port, not a.invert)
    return Principal(a.any, a.source_cidr, a.authenticated, not a.invert, a.header)


def _dnf(f: Formula, reasons: Reasons) -> list[list[Atom]]:
    """OR-of-AND groups of a negation-normal formula ([] is false, [[]] true)."""
    op, arg = f
    if op == "atom":
        return [[arg]]
    if op == "const":
        return [[]] if arg else []
    parts = [_dnf(x, reasons) for x in arg]
    if op == "or":
        out = [g for d in parts for g in d]
    else:
        out = [[]]
        for d in parts:
            out = [a + b for a, b in itertools.product(out, d)]
            if len(out) > MAX_GROUPS:
                break
    if len(out) > MAX_GROUPS:
        reasons.append(f"RBAC matcher: more than {MAX_GROUPS} alternatives")
        return out[:MAX_GROUPS]
    return out
