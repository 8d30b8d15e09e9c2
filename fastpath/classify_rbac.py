"""Envoy RBAC http filter config (proto-JSON) -> plan.Rbac, policy by policy.

Called by `fastpath.classify` for the rbac filter of each HttpConnectionManager;
owned by the split. Permissions and principals are brought to disjunctive
normal form (OR of AND-groups) because that is what the kernel's tables hold;
a rule the kernel can't evaluate (mTLS identity, metadata, XFF-derived address,
a NOT over a group) makes the policy, and so the listener's RBAC, ENVOY: a deny
is never bypassed (DESIGN.md §4 rule 4).
"""

from __future__ import annotations

import itertools
from typing import Any

from fastpath.classify_match import Reasons, header_match, string_match
from fastpath.classify_rbac_matcher import rbac_from_matcher
from fastpath.plan import Permission, Principal, Rbac, RbacPolicy, StringKind, Verdict

MAX_GROUPS = 64  # DNF expansion bound; beyond it the policy stays in Envoy
Dnf = list[list[Any]]


def classify_rbac(cfg: dict[str, Any]) -> tuple[Rbac | None, Reasons]:
    """The plan of one RBAC filter, or None if it enforces nothing."""
    reasons: Reasons = []
    if "matcher" in cfg:  # Envoy then ignores `rules`; an empty matcher denies everything
        return rbac_from_matcher(cfg["matcher"] or {})
    rules = cfg.get("rules")
    if rules is None:
        return None, []
    action = rules.get("action", "ALLOW")
    if action == "LOG":
        return None, []
    policies = tuple(classify_policy(name, p) for name, p in sorted(rules.get("policies", {}).items()))
    reasons += [f"policy {p.name!r}: {p.reason}" for p in policies if p.verdict is Verdict.ENVOY]
    verdict = Verdict.ENVOY if reasons else Verdict.KERNEL
    return Rbac(action, policies, verdict, "; ".join(reasons)), reasons


def classify_policy(name: str, p: dict[str, Any]) -> RbacPolicy:
    reasons: Reasons = []
    perms = _dnf_or([_perm(x, reasons) for x in p.get("permissions", [])], reasons)
    prins = _dnf_or([_prin(x, reasons) for x in p.get("principals", [])], reasons)
    if p.get("condition") or p.get("checkedCondition"):
        reasons.append("CEL condition")
    return RbacPolicy(name, tuple(tuple(g) for g in perms), tuple(tuple(g) for g in prins),
                      Verdict.ENVOY if reasons else Verdict.KERNEL, "; ".join(dict.fromkeys(reasons)))


def _dnf_or(parts: list[Dnf], reasons: Reasons) -> Dnf:
    out = [g for d in parts for g in d]
    if len(out) > MAX_GROUPS:
        reasons.append(f"more than {MAX_GROUPS} alternatives")
        return out[:MAX_GROUPS]
    return out


def _dnf_and(parts: list[Dnf], reasons: Reasons) -> Dnf:
    out: Dnf = [[]]
    for d in parts:
        out = [a + b for a, b in itertools.product(out, d)]
        if len(out) > MAX_GROUPS:
            reasons.append(f"more than {MAX_GROUPS} alternatives")
            return out[:MAX_GROUPS]
    return out


def _perm(x: dict[str, Any], reasons: Reasons) -> Dnf:
    if x.get("any"):
        return [[Permission(any=True)]]
    if "header" in x:
        hm, r = header_match(x["header"], "rbac header")
        reasons += r
        if hm.name == ":method" and hm.match and hm.match.kind is StringKind.EXACT \
                and not hm.invert and not hm.match.ignore_case:
            return [[Permission(method=hm.match.value)]]
        return [[Permission(headers=(hm,))]]
    if "urlPath" in x:
        sm, r = string_match(x["urlPath"].get("path", {}), "rbac url_path")
        reasons += r
        return [[Permission(path=sm)]]
    if "destinationPort" in x:
        return [[Permission(port=int(x["destinationPort"]))]]
    if "andRules" in x:
        return _dnf_and([_perm(y, reasons) for y in x["andRules"].get("rules", [])], reasons)
    if "orRules" in x:
        return _dnf_or([_perm(y, reasons) for y in x["orRules"].get("rules", [])], reasons)
    if "notRule" in x:
        d = _perm(x["notRule"], reasons)
        if len(d) == 1 and len(d[0]) == 1:
            p = d[0][0]
            return [[Permission(p.any, p.path, p.method, p.headers, p.port, not p.invert)]]
        reasons.append("rbac not_rule over a group")
        return [[Permission(any=True)]]
    reasons.append(f"rbac permission {sorted(x)[0] if x else '(empty)'}")
    return [[Permission(any=True)]]


def _prin(x: dict[str, Any], reasons: Reasons) -> Dnf:
    if x.get("any"):
        return [[Principal(any=True)]]
    for key in ("directRemoteIp", "sourceIp"):
        if key in x:
            cidr = f"{x[key].get('addressPrefix', '')}/{int(x[key].get('prefixLen', 32))}"
            return [[Principal(source_cidr=cidr)]]
    if "remoteIp" in x:
        reasons.append("rbac remote_ip (depends on x-forwarded-for)")
        return [[Principal(any=True)]]
    if "authenticated" in x:
        sm, _ = string_match(x["authenticated"].get("principalName", {"exact": ""}), "principal")
        reasons.append("rbac authenticated principal (mTLS identity, no TLS in the kernel)")
        return [[Principal(authenticated=sm)]]
    if "header" in x:
        hm, r = header_match(x["header"], "rbac principal header")
        reasons += r
        return [[Principal(header=hm)]]
    if "andIds" in x:
        return _dnf_and([_prin(y, reasons) for y in x["andIds"].get("ids", [])], reasons)
    if "orIds" in x:
        return _dnf_or([_prin(y, reasons) for y in x["orIds"].get("ids", [])], reasons)
    if "notId" in x:
        d = _prin(x["notId"], reasons)
        if len(d) == 1 and len(d[0]) == 1:
            p = d[0][0]
            return [[Principal(p.any, p.source_cidr, p.authenticated, not p.invert, p.header)]]
        reasons.append("rbac not_id over a group")
        return [[Principal(any=True)]]
    reasons.append(f"rbac principal {sorted(x)[0] if x else '(empty)'}")
    return [[Principal(any=True)]]
