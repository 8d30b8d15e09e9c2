"""AuthorizationPolicy -> Envoy RBAC HTTP filters for one workload's inbound.

Called by `xds_server.istio.sidecar` when it builds the inbound listener of a
pod. Semantics follow Istio: any matching DENY policy denies; if ALLOW
policies select the workload, a request must match one of them; a policy
with no rules allows nothing. Output is Envoy JSON dicts.

Identity without mTLS: L7FP's local mesh has no certificates, so a source
`principals` / `namespaces` condition is evaluated on the peer address: it
matches the IPs of the registry's pods running with that service account /
in that namespace (istiod would match the mTLS peer certificate instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .objects import Obj, ObjectSet, Warnings, as_list, check_fields
from .registry import Registry, Workload

RBAC = "envoy.filters.http.rbac"
TYPE_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ROOT_NAMESPACE = "istio-system"
NEVER: dict[str, Any] = {"notId": {"any": True}}


def policies_for(objs: ObjectSet, wl: Workload) -> list[Obj]:
    """AuthorizationPolicies that select workload `wl` (root namespace = mesh-wide)."""
    out = []
    for o in objs.of("AuthorizationPolicy"):
        if o.namespace not in (wl.namespace, ROOT_NAMESPACE):
            continue
        sel = (o.spec.get("selector") or {}).get("matchLabels") or {}
        if all(wl.labels.get(k) == v for k, v in sel.items()):
            out.append(o)
    return out


def rbac_filters(objs: ObjectSet, wl: Workload, reg: Registry) -> list[dict[str, Any]]:
    """The RBAC filters (DENY first, then ALLOW) for `wl`'s inbound HCM; may be empty."""
    w = objs.warnings
    deny: dict[str, Any] = {}
    allow: dict[str, Any] = {}
    has_allow = False
    for o in policies_for(objs, wl):
        spec = check_fields(w, o, "spec", o.spec, {"selector", "action", "rules", "provider",
                                                   "targetRef", "targetRefs"})
        action = str(spec.get("action") or "ALLOW").upper()
        if action in ("AUDIT", "CUSTOM"):
            w.add(o, "spec.action", f"{action} is unsupported (needs an audit/ext_authz provider); "
                  "policy ignored")
            continue
        for key in ("targetRef", "targetRefs"):
            if key in spec:
                w.add(o, f"spec.{key}", "targets waypoints/gateways; ignored for sidecars")
        target = deny if action == "DENY" else allow
        has_allow |= action == "ALLOW"
        for i, rule in enumerate(as_list(w, o, "spec.rules", spec.get("rules"))):
            target[f"ns[{o.namespace}]-policy[{o.name}]-rule[{i}]"] = _policy(w, o, i, rule or {}, reg)
    filters = []
    if deny:
        filters.append(_filter("DENY", deny))
    if has_allow:
        filters.append(_filter("ALLOW", allow))
    return filters


def _filter(action: str, policies: Mapping[str, Any]) -> dict[str, Any]:
    name = RBAC if action == "ALLOW" else f"{RBAC}.deny"
    return {"name": name, "typedConfig": {"@type": TYPE_RBAC,
                                          "rules": {"action": action, "policies": dict(policies)}}}


def _policy(w: Warnings, o: Obj, i: int, rule: Any, reg: Registry) -> dict[str, Any]:
    path = f"spec.rules[{i}]"
    rule = check_fields(w, o, path, rule, {"from", "to", "when"})
    froms = [_source(w, o, f"{path}.from[{j}]", f, reg)
             for j, f in enumerate(as_list(w, o, f"{path}.from", rule.get("from")))]
    tos = [_operation(w, o, f"{path}.to[{j}]", t)
           for j, t in enumerate(as_list(w, o, f"{path}.to", rule.get("to")))]
    perms: list[dict[str, Any]] = [_or(tos)] if tos else []
    principals: list[dict[str, Any]] = [_or(froms, "orIds", "ids")] if froms else []
    for j, cond in enumerate(as_list(w, o, f"{path}.when", rule.get("when"))):
        kind, m = _condition(w, o, f"{path}.when[{j}]", cond, reg)
        (perms if kind == "perm" else principals).append(m)
    return {"permissions": [_and_perms(perms)], "principals": [_and_ids(principals)]}


def _or(items: list[dict[str, Any]], key: str = "orRules", sub: str = "rules") -> dict[str, Any]:
    return items[0] if len(items) == 1 else {key: {sub: items}}


def _and_perms(items: list[dict[str, Any]]) -> dict[str, Any]:
    if not items:
        return {"any": True}
    return items[0] if len(items) == 1 else {"andRules": {"rules": items}}


def _source(w: Warnings, o: Obj, path: str, f: Any, reg: Registry) -> dict[str, Any]:
    f = check_fields(w, o, path, f, {"source"})
    src = check_fields(w, o, f"{path}.source", f.get("source"), {
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
        "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks",
        "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts"})
    ids: list[dict[str, Any]] = []
    for key, neg in (("principals", False), ("notPrincipals", True)):
        if key in src:
            ids.append(_ids([_ips(_principal_pods(reg, p)) for p in src[key]], neg))
    for key, neg in (("namespaces", False), ("notNamespaces", True)):
        if key in src:
            ids.append(_ids([_ips(_ns_pods(reg, n)) for n in src[key]], neg))
    for key, neg in (("ipBlocks", False), ("notIpBlocks", True)):
        if key in src:
            ids.append(_ids([_cidr(b, "directRemoteIp") for b in src[key]], neg))
    for key, neg in (("remoteIpBlocks", False), ("notRemoteIpBlocks", True)):
        if key in src:
            ids.append(_ids([_cidr(b, "remoteIp") for b in src[key]], neg))
    for key, neg in (("requestPrincipals", False), ("notRequestPrincipals", True)):
        if key in src:
            w.add(o, f"{path}.source.{key}", "JWT: RequestAuthentication is not imported, so (as in "
                  "istiod without one) no request carries a principal")
            ids.append(_ids([_authn(["request.auth.principal"], str(v)) for v in src[key]], neg))
    return _and_ids(ids)


def _authn(path: list[str], value: str) -> dict[str, Any]:
    """istiod's principal on JWT data: metadata the jwt_authn filter would set."""
    return {"metadata": {"filter": "istio_authn", "path": [{"key": k} for k in path],
                         "value": {"stringMatch": _glob(value)}}}


def _and_ids(ids: list[dict[str, Any]]) -> dict[str, Any]:
    if not ids:
        return {"any": True}
    return ids[0] if len(ids) == 1 else {"andIds": {"ids": ids}}


def _ids(items: list[dict[str, Any]], negate: bool) -> dict[str, Any]:
    m = items[0] if len(items) == 1 else {"orIds": {"ids": items}}
    return {"notId": m} if negate else m


def _ips(pods: list[Workload]) -> dict[str, Any]:
    if not pods:
        return NEVER
    ids = [_cidr(p.ip, "directRemoteIp") for p in pods]
    return ids[0] if len(ids) == 1 else {"orIds": {"ids": ids}}


def _principal_pods(reg: Registry, principal: str) -> list[Workload]:
    """`cluster.local/ns/NS/sa/SA` (with `*` wildcards) -> pods with that identity."""
    if principal == "*":
        return list(reg.workloads)
    parts = principal.split("/")
    ns = parts[parts.index("ns") + 1] if "ns" in parts else None
    sa = parts[parts.index("sa") + 1] if "sa" in parts else None
    return reg.workloads_with_identity(None if ns in (None, "*") else ns,
                                       None if sa in (None, "*") else sa)


def _ns_pods(reg: Registry, ns: str) -> list[Workload]:
    return list(reg.workloads) if ns == "*" else reg.workloads_with_identity(ns, None)


def _cidr(block: str, field: str) -> dict[str, Any]:
    ip, _, plen = str(block).partition("/")
    return {field: {"addressPrefix": ip, "prefixLen": int(plen) if plen else (128 if ":" in ip else 32)}}


def _operation(w: Warnings, o: Obj, path: str, t: Any) -> dict[str, Any]:
    t = check_fields(w, o, path, t, {"operation"})
    op = check_fields(w, o, f"{path}.operation", t.get("operation"), {
        "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"})
    rules: list[dict[str, Any]] = []
    for key, conv in (("hosts", _host), ("ports", _port), ("methods", _method), ("paths", _path)):
        for name, neg in ((key, False), ("not" + key.capitalize(), True)):
            if name in op:
                items = [conv(v) for v in op[name]]
                m = items[0] if len(items) == 1 else {"orRules": {"rules": items}}
                rules.append({"notRule": m} if neg else m)
    if not rules:
        return {"any": True}
    return rules[0] if len(rules) == 1 else {"andRules": {"rules": rules}}


def _host(v: str) -> dict[str, Any]:
    return {"header": {"name": ":authority", "stringMatch": _glob(str(v), ignore_case=True)}}


def _port(v: Any) -> dict[str, Any]:
    return {"destinationPort": int(v)}


def _method(v: str) -> dict[str, Any]:
    return {"header": {"name": ":method", "stringMatch": {"exact": str(v)}}}


def _path(v: str) -> dict[str, Any]:
    return {"urlPath": {"path": _glob(str(v))}}


def _glob(v: str, ignore_case: bool = False) -> dict[str, Any]:
    """Istio's `*` forms: `*` any, `pre*` prefix, `*suf` suffix, else exact."""
    if v == "*":
        m: dict[str, Any] = {"safeRegex": {"regex": ".+"}}
    elif v.endswith("*"):
        m = {"prefix": v[:-1]}
    elif v.startswith("*"):
        m = {"suffix": v[1:]}
    else:
        m = {"exact": v}
    if ignore_case and "safeRegex" not in m:
        m["ignoreCase"] = True
    return m


def _condition(w: Warnings, o: Obj, path: str, cond: Any, reg: Registry) -> tuple[str, dict[str, Any]]:
    cond = check_fields(w, o, path, cond, {"key", "values", "notValues"})
    key = str(cond.get("key", ""))
    values, not_values = list(cond.get("values") or []), list(cond.get("notValues") or [])

    def both(conv: Any, kind: str) -> tuple[str, dict[str, Any]]:
        items: list[dict[str, Any]] = []
        wrap = "orIds" if kind == "id" else "orRules"
        sub = "ids" if kind == "id" else "rules"
        neg = "notId" if kind == "id" else "notRule"
        if values:
            vs = [conv(v) for v in values]
            items.append(vs[0] if len(vs) == 1 else {wrap: {sub: vs}})
        if not_values:
            vs = [conv(v) for v in not_values]
            items.append({neg: vs[0] if len(vs) == 1 else {wrap: {sub: vs}}})
        if kind == "id":
            return "id", _and_ids(items)
        return "perm", items[0] if len(items) == 1 else {"andRules": {"rules": items}}

    if key.startswith("request.headers[") and key.endswith("]"):
        name = key[len("request.headers["):-1].lower()
        return both(lambda v: {"header": {"name": name, "stringMatch": _glob(str(v))}}, "perm")
    if key == "destination.port":
        return both(_port, "perm")
    if key in ("source.ip", "remote.ip"):
        return both(lambda v: _cidr(v, "directRemoteIp" if key == "source.ip" else "remoteIp"), "id")
    if key == "source.namespace":
        return both(lambda v: _ips(_ns_pods(reg, str(v))), "id")
    if key == "source.principal":
        return both(lambda v: _ips(_principal_pods(reg, str(v))), "id")
    if key.startswith("request.auth."):
        w.add(o, f"{path}.key", f"{key}: JWT data; RequestAuthentication is not imported, so no "
              "request carries it")
        keys = [key[:key.index("[")], key[key.index("[") + 1:-1]] if "[" in key else [key]
        return both(lambda v: _authn(keys, str(v)), "id")
    w.add(o, f"{path}.key", f"condition {key!r} is unsupported; the condition never matches")
    return "id", NEVER
