"""Gateway API HTTPRoute / GRPCRoute -> VirtualService-shaped specs.

Called by `xds_server.istio.sidecar.mesh_from`, the split reader and
`xds_server.istio.gateway`. istiod itself converts Gateway API routes to
VirtualServices internally; we do the same, so the Istio defaults (timeouts,
retries) apply alike. Routes attached to a Service (GAMMA,
`parentRefs[].kind: Service`) apply to sidecars; routes attached to a Gateway
apply to that Gateway's proxies (`attached_routes`; kept by `convert` when
`mesh_only=False`, for the split's coverage report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .objects import Obj, ObjectSet, Warnings, as_list, check_fields
from .registry import Registry

GROUP = "gateway.networking.k8s.io"
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
RULE_FIELDS = {"name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"}
REF_FIELDS = {"name", "namespace", "port", "weight", "kind", "group", "filters"}


def as_virtual_services(objs: ObjectSet, reg: Registry, mesh_only: bool,
                        placement: str = "") -> list[Obj]:
    """`placement` (`l7fp split`, quiet): "mesh" keeps the routes attached to a
    Service (what sidecars apply), "gateway" those attached to Gateways only,
    as a VirtualService bound to those gateways; "" as `mesh_only` says."""
    out = []
    for kind in ROUTE_KINDS:
        for o in objs.of(kind):
            vs = convert(objs.warnings, o, reg, mesh_only, placement)
            if vs is not None:
                out.append(vs)
    return out


def convert(w: Warnings, o: Obj, reg: Registry, mesh_only: bool, placement: str = "") -> Obj | None:
    spec = check_fields(w, o, "spec", o.spec, {"parentRefs", "hostnames", "rules"})
    services: list[str] = []
    gateways: list[str] = []
    for i, ref in enumerate(as_list(w, o, "spec.parentRefs", spec.get("parentRefs"))):
        ref = check_fields(w, o, f"spec.parentRefs[{i}]", ref,
                           {"name", "namespace", "kind", "group", "port", "sectionName"})
        if ref.get("kind") == "Service":
            services.append(reg.fqdn(str(ref.get("name")), str(ref.get("namespace") or o.namespace)))
            continue
        gateways.append(str(ref.get("name")))  # served to that Gateway (attached_routes)
    vs_spec: dict[str, Any] = {}
    hostnames = [str(h) for h in spec.get("hostnames") or ["*"]]
    if placement == "gateway":  # a route with a Service parent is the mesh's (counted there)
        hosts = [] if services else hostnames if gateways else []
        vs_spec["gateways"] = sorted(set(gateways))
    elif mesh_only or placement == "mesh":
        hosts = services
    else:
        hosts = services + (hostnames if gateways else [])
    if not hosts:
        return None
    http = [_rule(w, o, i, r) for i, r in enumerate(as_list(w, o, "spec.rules", spec.get("rules")))]
    vs_spec.update({"hosts": sorted(set(hosts)), "http": [r for r in http if r is not None]})
    return Obj(o.kind, o.name, o.namespace, vs_spec, o.raw, o.source)


def attached_routes(objs: ObjectSet, gw: Obj, listener: str, port: int) -> list[Obj]:
    """The HTTPRoutes / GRPCRoutes attached to listener `listener` (port
    `port`) of the Gateway API Gateway `gw` (a parentRef naming it, with that
    sectionName and port or none), VirtualService-shaped: `hosts` their
    hostnames (`*` when none), `http` their rules. Read by
    xds_server.istio.gateway."""
    out = []
    for kind in ROUTE_KINDS:
        for o in objs.of(kind):
            refs = [r for r in o.spec.get("parentRefs") or [] if isinstance(r, Mapping)]
            if not any(_attaches(r, o.namespace, gw, listener, port) for r in refs):
                continue
            w = objs.warnings
            http = [_rule(w, o, i, r) for i, r in enumerate(as_list(w, o, "spec.rules", o.spec.get("rules")))]
            hosts = [str(h) for h in o.spec.get("hostnames") or ["*"]]
            out.append(Obj(o.kind, o.name, o.namespace, {"hosts": hosts, "http": [r for r in http if r]},
                           o.raw, o.source))
    return out


def parent_gateways(o: Obj) -> list[tuple[int, str]]:
    """(index, `NS/NAME`) of each Gateway among the route `o`'s parentRefs."""
    return [(i, f"{r.get('namespace') or o.namespace}/{r.get('name')}")
            for i, r in enumerate(o.spec.get("parentRefs") or [])
            if isinstance(r, Mapping) and _is_gateway(r)]


def _is_gateway(ref: Mapping[str, Any]) -> bool:
    return ref.get("kind", "Gateway") == "Gateway" and str(ref.get("group", GROUP)) == GROUP


def _attaches(ref: Mapping[str, Any], route_ns: str, gw: Obj, listener: str, port: int) -> bool:
    return (_is_gateway(ref) and str(ref.get("name")) == gw.name
            and str(ref.get("namespace") or route_ns) == gw.namespace
            and ref.get("sectionName") in (None, listener) and ref.get("port") in (None, port))


def _rule(w: Warnings, o: Obj, i: int, rule: Any) -> dict[str, Any] | None:
    path = f"spec.rules[{i}]"
    rule = check_fields(w, o, path, rule, RULE_FIELDS)
    out: dict[str, Any] = {}
    if rule.get("name"):
        out["name"] = str(rule["name"])
    matches = [_match(w, o, f"{path}.matches[{j}]", m)
               for j, m in enumerate(as_list(w, o, f"{path}.matches", rule.get("matches")))]
    if matches:
        out["match"] = matches
    dests = []
    for j, ref in enumerate(as_list(w, o, f"{path}.backendRefs", rule.get("backendRefs"))):
        ref = check_fields(w, o, f"{path}.backendRefs[{j}]", ref, REF_FIELDS)
        if ref.get("kind", "Service") not in ("Service", "ServiceImport"):
            w.add(o, f"{path}.backendRefs[{j}].kind", f"{ref.get('kind')} backends unsupported; dropped")
            continue
        d: dict[str, Any] = {"destination": _dest(o, ref), "weight": int(ref.get("weight", 1))}
        for k, f in enumerate(as_list(w, o, f"{path}.backendRefs[{j}].filters", ref.get("filters"))):
            _filter(w, o, f"{path}.backendRefs[{j}].filters[{k}]", f, d, per_backend=True)
        dests.append(d)
    if len(dests) > 1 and sum(d["weight"] for d in dests) == 0:
        dests = dests[:1]
    if len(dests) == 1:
        dests[0].pop("weight")
    for j, f in enumerate(as_list(w, o, f"{path}.filters", rule.get("filters"))):
        _filter(w, o, f"{path}.filters[{j}]", f, out, per_backend=False)
    if "redirect" not in out:
        if dests:
            out["route"] = dests
        else:
            # Gateway API: a rule without backends answers 500.
            out["directResponse"] = {"status": 500}
    timeouts = check_fields(w, o, f"{path}.timeouts", rule.get("timeouts"), {"request", "backendRequest"})
    if "request" in timeouts:
        out["timeout"] = str(timeouts["request"])
    if "backendRequest" in timeouts:
        out.setdefault("retries", {})["perTryTimeout"] = str(timeouts["backendRequest"])
    if "retry" in rule:
        r = check_fields(w, o, f"{path}.retry", rule["retry"], {"codes", "attempts", "backoff"})
        retries = out.setdefault("retries", {})
        retries["attempts"] = int(r.get("attempts", 2))
        if r.get("codes"):
            retries["retryOn"] = ",".join(str(c) for c in r["codes"])
    if "sessionPersistence" in rule:
        w.add(o, f"{path}.sessionPersistence", "unsupported; ignored")
    return out


def _dest(o: Obj, ref: Any) -> dict[str, Any]:
    ns = str(ref.get("namespace") or o.namespace)
    host = str(ref.get("name"))
    dest: dict[str, Any] = {"host": host if ns == o.namespace else f"{host}.{ns}"}
    if "port" in ref:
        dest["port"] = {"number": int(ref["port"])}
    return dest


def _match(w: Warnings, o: Obj, path: str, m: Any) -> dict[str, Any]:
    m = check_fields(w, o, path, m, {"path", "headers", "queryParams", "method"})
    out: dict[str, Any] = {}
    if "path" in m:
        p = check_fields(w, o, f"{path}.path", m["path"], {"type", "value"})
        kind = str(p.get("type", "PathPrefix"))
        value = str(p.get("value", "/"))
        if kind == "PathPrefix" and value.rstrip("/"):
            # Gateway API prefixes match whole path segments: /foo matches /foo and
            # /foo/bar, not /foobar (Envoy's path_separated_prefix).
            out["uri"] = {"pathSeparatedPrefix": value.rstrip("/")}
        else:
            key = {"PathPrefix": "prefix", "Exact": "exact", "RegularExpression": "regex"}.get(kind, "prefix")
            out["uri"] = {key: value}
    if "method" in m:
        meth = m["method"]
        if isinstance(meth, dict):  # GRPCRoute method match
            svc, name = meth.get("service"), meth.get("method")
            if str(meth.get("type", "Exact")) == "RegularExpression":
                out["uri"] = {"regex": f"/{svc or '.+'}/{name or '.+'}"}
            elif svc and name:
                out["uri"] = {"exact": f"/{svc}/{name}"}
            elif svc:
                out["uri"] = {"prefix": f"/{svc}/"}
            else:
                out["uri"] = {"regex": f"/[^/]+/{name}"}
        else:
            out["method"] = {"exact": str(meth)}
    for key, dst in (("headers", "headers"), ("queryParams", "queryParams")):
        items = {}
        for h in as_list(w, o, f"{path}.{key}", m.get(key)):
            op = "regex" if h.get("type") == "RegularExpression" else "exact"
            items[str(h.get("name"))] = {op: str(h.get("value", ""))}
        if items:
            out[dst] = items
    return out


def _filter(w: Warnings, o: Obj, path: str, f: Any, out: dict[str, Any], per_backend: bool) -> None:
    kind = str(f.get("type", ""))
    if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        body = f.get("requestHeaderModifier" if kind.startswith("Request") else "responseHeaderModifier") or {}
        side = "request" if kind.startswith("Request") else "response"
        ops = out.setdefault("headers", {}).setdefault(side, {})
        for op in ("set", "add"):
            for h in body.get(op) or []:
                ops.setdefault(op, {})[str(h["name"])] = str(h["value"])
        if body.get("remove"):
            ops.setdefault("remove", []).extend(body["remove"])
    elif per_backend:
        w.add(o, path, f"{kind} filter on a backendRef is unsupported; ignored")
    elif kind == "RequestRedirect":
        r = f.get("requestRedirect") or {}
        red: dict[str, Any] = {"redirectCode": int(r.get("statusCode", 302))}
        if "hostname" in r:
            red["authority"] = r["hostname"]
        if "scheme" in r:
            red["scheme"] = r["scheme"]
        if "port" in r:
            red["port"] = int(r["port"])
        p = r.get("path") or {}
        if "replaceFullPath" in p:
            red["uri"] = p["replaceFullPath"]
        elif "replacePrefixMatch" in p:
            w.add(o, f"{path}.requestRedirect.path", "replacePrefixMatch redirect: full path used")
            red["uri"] = p["replacePrefixMatch"]
        out["redirect"] = red
    elif kind == "URLRewrite":
        r = f.get("urlRewrite") or {}
        rw = out.setdefault("rewrite", {})
        if "hostname" in r:
            rw["authority"] = r["hostname"]
        p = r.get("path") or {}
        if "replacePrefixMatch" in p:
            rw["uri"] = p["replacePrefixMatch"]
        elif "replaceFullPath" in p:
            rw["uriRegexRewrite"] = {"match": "/.*", "rewrite": p["replaceFullPath"]}  # istiod's
    elif kind == "RequestMirror":
        r = f.get("requestMirror") or {}
        out.setdefault("mirrors", []).append({"destination": _dest(o, r.get("backendRef") or {}),
                                              "percentage": {"value": _mirror_percent(r)}})
    else:
        w.add(o, path, f"filter type {kind!r} is unsupported; ignored")


def _mirror_percent(r: dict[str, Any]) -> float:
    """HTTPRequestMirrorFilter `percent` (0-100) or `fraction` (numerator /
    denominator, default 100); neither: every request (Gateway API v1.2+)."""
    frac = r.get("fraction")
    if isinstance(frac, dict):
        den = float(frac.get("denominator", 100) or 100)
        return 100.0 * float(frac.get("numerator", 0)) / den
    return float(r.get("percent", 100))
