"""The table builder behind fastpath.synth.synthesize (K1).

Walks a KernelPlan once, in plan order, and collects the rows of every plan
table (listeners, domains, virtual hosts, routes, header matchers, weighted
clusters, clusters, reply and header-add blobs, token buckets) plus the loop
bounds the plan needs. Semantics follow fastpath.reference (the oracle).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

from fastpath import bpf_structs as bs
from fastpath import rewrite_kernel, synth_dfa
from fastpath.plan import (
    ClusterAction,
    DirectResponse,
    HeaderMatch,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    LocalRateLimit,
    PathKind,
    PathRewrite,
    QueryParamMatch,
    Redirect,
    Route,
    RouteMatch,
    StringKind,
    Verdict,
    VirtualHost,
)
from fastpath.rewrite import ORIGINAL_PATH, prefix_rewrite
from fastpath.synth import (
    FAULT_BODY,
    MAX_DOMAINS_CAP,
    MAX_HMATCH_CAP,
    MAX_NAME,
    MAX_RBAC_CAP,
    MAX_ROUTES_CAP,
    MAX_STR_CAP,
    MAX_WEIGHTED_CAP,
    RATE_LIMITED_BODY,
    SAFE_TARGET,
    Punt,
    _pow2,
    encode_str,
    reply_bytes,
)
from fastpath.synth_punt import CATCH_ALL, MAX_QMATCH, disjoint, is_exact, kernel_part
from fastpath.tracing import ZIPKIN_FLAG

_SM = {StringKind.EXACT: bs.SM_EXACT, StringKind.PREFIX: bs.SM_PREFIX,
       StringKind.SUFFIX: bs.SM_SUFFIX, StringKind.PRESENT: bs.SM_PRESENT}
MAX_SLOTS = 8
NO_HEALTHY_BODY = "no healthy upstream"  # Envoy's 503 when its LB has no host (router.cc)
MAX_QNAME = 16  # longest query parameter name (two words in struct l7fp_qmatch)
MAX_ABSENT_NAME = 64  # longest header name a must-be-absent check keys (see _slot)


@dataclass
class _Row:
    """A table row before encoding: the struct name and its fields."""

    kind: str
    f: dict[str, Any]


def _catches_all(f: dict[str, Any]) -> bool:
    """A punt entry that every request of its virtual host matches (TableBuilder._punt)."""
    return (f.get("action") == bs.ACT_PUNT and f.get("path_kind") == bs.PATH_PREFIX
            and f.get("path") == ("", False) and not f.get("n_hm") and not f.get("q_rows")
            and not f.get("method"))


def punt_catches_all(r: Route) -> bool:
    """True when the punt entry the kernel builds for route `r`
    (TableBuilder._punt) catches every request of its virtual host: no part
    of its matcher but prefix "" or "/" is evaluated in the kernel, or prefix
    "" with no other matcher. Read by
    fastpath.inbound_verdict (such an inbound punt overlaps and covers every
    client route). Built on a fresh builder: a punt that depends on the other
    routes (too many distinct header names) is not seen, so it may say False
    where the synthesis punts (the view then keeps KERNEL, as before)."""
    return _catches_all(TableBuilder(KernelPlan("", ""))._punt(r))


def _any_path(m: RouteMatch) -> bool:
    """`m` matches every request the kernel decides (its paths start with "/":
    fastpath.reference._unparseable)."""
    return (m.path_kind is PathKind.PREFIX and m.path in ("", "/") and not m.headers
            and not m.query_params and not m.grpc)


@functools.lru_cache(maxsize=1024)
def punt_match(m: RouteMatch) -> RouteMatch:
    """The matcher the kernel's punt entry for a route with matcher `m`
    evaluates (fastpath.synth_punt.kernel_part), on a fresh builder (as
    punt_catches_all). Called by fastpath.reference for every ENVOY route, so
    the model stops where the kernel does, and by fastpath.inbound_verdict."""
    return kernel_part(TableBuilder(KernelPlan("", "")), m)


@dataclass
class TableBuilder:
    plan: KernelPlan
    rows: dict[str, list[_Row]] = field(default_factory=dict)
    blobs: dict[str, list[tuple[bytes, tuple[int, ...]]]] = field(default_factory=dict)
    listener_ids: dict[str, int] = field(default_factory=dict)
    cluster_ids: dict[str, int] = field(default_factory=dict)
    route_names: list[str] = field(default_factory=list)
    routes: list[Any] = field(default_factory=list)  # plan.Route per route id (None: filler)
    route_timeouts: dict[int, int] = field(default_factory=dict)  # route id -> ms (kernel routes)
    # cluster name -> reply index of Envoy's 503 "no healthy upstream" (outlier
    # detection without panic can leave no host: dp_outlier.h answers it)
    no_healthy: dict[str, int] = field(default_factory=dict)
    rewrites: dict[int, bytes] = field(default_factory=dict)  # route id -> dp_rw entry
    notes: list[str] = field(default_factory=list)
    # id(plan.Route) of every KERNEL route the decision executes, and why the
    # others it was handed became punts (read by synth.executable_plan)
    kernel_routes: set[int] = field(default_factory=set)
    punt_reasons: dict[int, str] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    longest: int = 8
    max_dom: int = 1
    max_routes: int = 1
    max_hm: int = 1
    max_wc: int = 1
    max_rbac: int = 1
    max_qm: int = 1
    feats: set[str] = field(default_factory=set)
    qrows: dict[int, list[_Row]] = field(default_factory=dict)  # route id -> query matchers

    # ---- rows ----
    def _add(self, table: str, row: _Row) -> int:
        rows = self.rows.setdefault(table, [])
        rows.append(row)
        return len(rows) - 1

    def _blob(self, table: str, data: bytes, absent: tuple[int, ...] = ()) -> int:
        lst = self.blobs.setdefault(table, [])
        if (data, absent) in lst:
            return lst.index((data, absent))
        lst.append((data, absent))
        return len(lst) - 1

    def _str(self, s: str) -> str:
        if len(s.encode()) > MAX_STR_CAP:
            raise Punt(f"string longer than {MAX_STR_CAP} bytes")
        self.longest = max(self.longest, len(s.encode()))
        return s

    def _slot(self, name: str, exact: bool = True) -> int:
        """The request-header slot of `name`. A name longer than MAX_NAME is keyed
        by (length, first 8, last 8 bytes), so two names can share a key: fine
        for a must-be-absent check (`exact=False`: a false hit only sends the
        request to Envoy), not for a value matcher. Istio sets the 21-byte
        x-envoy-attempt-count on every route (include_request_attempt_count)."""
        name = name.lower()
        if len(name) > (MAX_NAME if exact else MAX_ABSENT_NAME) or name.startswith(":"):
            raise Punt(f"header name {name!r} not matched in the kernel")
        if exact and len(name) > 16:  # the parser keys its middle bytes too
            self.feats.add("long_names")
        if name not in self.slots:
            if len(self.slots) >= MAX_SLOTS:
                raise Punt("too many distinct header names")
            self.slots[name] = len(self.slots)
        return self.slots[name]

    # ---- plan walk ----
    def build(self) -> None:
        for c in self.plan.clusters:
            self.cluster_ids[c.name] = self._add("l7fp_clusters", _Row("Cluster", self._cluster(c)))
            if c.outlier is not None and c.outlier.panic_percent <= 0:
                self.no_healthy[c.name] = self._reply(503, NO_HEALTHY_BODY)
        for lp in self.plan.listeners:
            self.listener_ids[lp.name] = len(self.rows.get("l7fp_listeners", []))
            self._listener(lp)

    def _cluster(self, c: Any) -> dict[str, int]:
        healthy = [e for e in c.endpoints if e.healthy]
        pool = healthy if c.endpoints and len(healthy) * 2 >= len(c.endpoints) else c.endpoints
        lb = {LbPolicy.ROUND_ROBIN: bs.LB_ROUND_ROBIN,
              LbPolicy.LEAST_REQUEST: bs.LB_LEAST_REQUEST}.get(c.lb_policy, bs.LB_RANDOM)
        if lb == bs.LB_LEAST_REQUEST and len(pool) > 1:
            self.feats.add("least_request")  # the in-flight counts (l7fp_decide.h l7fp_pick_lr)
        return {"lb": lb, "n_endpoints": len(pool)}

    def _listener(self, lp: ListenerPlan) -> None:
        row = _Row("Listener", {"flags": 0, "dom_base": 0, "n_dom": 0, "bucket": 0,
                                "nomatch": self._reply(404, "") + 1})
        self._add("l7fp_listeners", row)
        if lp.verdict is Verdict.ENVOY:
            row.f["flags"] = bs.LF_PUNT
            self.notes.append(f"listener {lp.name}: {lp.reason}")
            self._punted(lp.virtual_hosts, f"listener: {lp.reason}")
            return
        if lp.trace_sampling is not None:  # bpf_src/dp_xrid.h (fastpath.tracing)
            row.f["trace"] = lp.trace_sampling + 1 | (ZIPKIN_FLAG if lp.trace_provider == "zipkin" else 0)
        try:
            self._filters(lp, row)
        except Punt as e:
            row.f["flags"] = bs.LF_PUNT
            self.notes.append(f"listener {lp.name}: {e}")
            self._punted(lp.virtual_hosts, f"listener: {e}")
            return
        base = len(self.rows.get("l7fp_vhosts", []))
        try:
            doms = self._domains(lp.virtual_hosts, base)
        except Punt as e:
            row.f["flags"] = bs.LF_PUNT
            self.notes.append(f"listener {lp.name}: {e}")
            self._punted(lp.virtual_hosts, f"listener: {e}")
            return
        row.f["dom_base"] = len(self.rows.get("l7fp_domains", []))
        row.f["n_dom"] = len(doms)
        self.max_dom = max(self.max_dom, len(doms))
        for d in doms:
            self._add("l7fp_domains", d)
        for vh in lp.virtual_hosts:
            self._vhost(lp, vh)

    def _filters(self, lp: ListenerPlan, row: _Row) -> None:
        """The HCM's policy filter order, listener bucket and HCM-level fault."""
        codes = {"local_ratelimit": bs.FILT_RATE_LIMIT, "fault": bs.FILT_FAULT,
                 "rbac": bs.FILT_RBAC}
        rbacs = iter(getattr(lp, "rbacs", ()) or ((lp.rbac,) if lp.rbac else ()))
        order: list[int] = []
        enforced: list[Any] = []
        for f in getattr(lp, "filter_order", ("rbac", "local_ratelimit", "fault")):
            if f not in codes:
                raise Punt(f"filter {f!r} not known to the kernel")
            if f != "rbac":
                order.append(codes[f])
                continue
            rb = next(rbacs, None)
            if rb is None or rb.shadow:  # no such filter, or log-only
                continue
            if len(enforced) == bs.MAX_RBAC_FILTERS:
                raise Punt(f"more than {bs.MAX_RBAC_FILTERS} enforcing RBAC filters")
            order.append(bs.FILT_RBAC + len(enforced))
            enforced.append(rb)
        if len(order) > bs.MAX_FILTERS:
            raise Punt("too many policy filters")
        if enforced:
            self._rbac(enforced, lp, row)
        row.f["order"] = sum(code << (4 * i) for i, code in enumerate(order))
        if lp.local_rate_limit:
            row.f["bucket"] = self._bucket(lp.local_rate_limit) + 1
        fault = getattr(lp, "fault_abort", None)
        if fault is not None:
            if fault.header_controlled:
                raise Punt("header-controlled fault")
            self.feats.add("fault")
            row.f["fault_status"] = fault.status
            row.f["fault_per_million"] = fault.per_million
            row.f["fault_reply"] = self._reply(fault.status, FAULT_BODY)

    def _rbac(self, rbacs: list[Any], lp: ListenerPlan, row: _Row) -> None:
        """The RBAC rows of a listener, filter after filter (see l7fp_rbac.h)."""
        rows: list[_Row] = []
        deny = 0
        for f, rbac in enumerate(rbacs):
            if rbac.verdict is Verdict.ENVOY:
                raise Punt(f"RBAC needs Envoy: {rbac.reason}")
            start = len(rows)
            for pol in rbac.policies:
                if pol.verdict is Verdict.ENVOY:
                    raise Punt(f"RBAC policy {pol.name} needs Envoy: {pol.reason}")
                self._rbac_side(rows, pol.permissions, lambda p: self._perm_rows(p, lp), 0)
                self._rbac_side(rows, pol.principals, self._prin_rows, bs.RB_PRIN)
            if len(rows) == start:  # no policy: nothing matches
                rows.append(_Row("RbacRow", {"kind": bs.RK_FALSE, "ends": bs.RB_ITEM | bs.RB_GROUP}))
            rows[-1].f["ends"] |= bs.RB_FILTER
            deny |= int(rbac.action == "DENY") << f
        if len(rows) > MAX_RBAC_CAP:
            raise Punt(f"RBAC with more than {MAX_RBAC_CAP} atoms")
        self.feats.add("rbac")
        self.max_rbac = max(self.max_rbac, len(rows))
        row.f["rbac_base"] = len(self.rows.get("l7fp_rbac", []))
        row.f["rbac_n"] = len(rows)
        row.f["rbac_nf"] = len(rbacs)
        row.f["rbac_deny"] = deny
        row.f["rbac_reply"] = self._reply(403, "RBAC: access denied")
        for r in rows:
            self._add("l7fp_rbac", r)

    def _rbac_side(self, rows: list[_Row], groups: Any, fields: Any, prin: int) -> None:
        """One side (permissions or principals) of a policy: OR of AND-groups."""
        start = len(rows)
        if not groups:  # any() of nothing: no match
            rows.append(_Row("RbacRow", {"kind": bs.RK_FALSE, "ends": bs.RB_ITEM | bs.RB_GROUP}))
        for g in groups:
            if not g:  # all() of nothing: a match
                rows.append(_Row("RbacRow", {"kind": bs.RK_TRUE, "ends": bs.RB_ITEM}))
            for item in g:
                atoms = fields(item) or [{"kind": bs.RK_TRUE}]
                for a in atoms:
                    rows.append(_Row("RbacRow", {"ends": 0, **a}))
                rows[-1].f["ends"] |= bs.RB_ITEM | (bs.RB_INVERT if item.invert else 0)
            rows[-1].f["ends"] |= bs.RB_GROUP
        rows[-1].f["ends"] |= bs.RB_SIDE
        for r in rows[start:]:
            r.f["ends"] |= prin

    def _perm_rows(self, p: Any, lp: ListenerPlan) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if p.path is not None and p.path.kind in (StringKind.CONTAINS, StringKind.REGEX):
            out.append({"kind": bs.RK_PATH, "m": self._dfa_m(p.path)})
        elif p.path is not None:
            kind = _SM.get(p.path.kind)
            if kind is None:
                raise Punt(f"RBAC path matcher {p.path.kind.value}")
            out.append({"kind": bs.RK_PATH, "m": {"kind": kind, "v": (
                self._str(p.path.value), p.path.ignore_case)}})
        if p.method is not None:
            out.append(self._method_atom(p.method))
        if p.port is not None:  # the listener's port: known now
            out.append({"kind": bs.RK_TRUE if p.port == lp.port else bs.RK_FALSE})
        for h in p.headers:
            out.append(self._header_atom(h))
        return out

    def _prin_rows(self, p: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if p.source_cidr is not None:
            out.append(self._cidr_atom(p.source_cidr))
        if p.header is not None:
            out.append(self._header_atom(p.header))
        if p.authenticated is not None:  # plaintext on the fast path: no peer identity
            out.append({"kind": bs.RK_FALSE})
        return out

    def _cidr_atom(self, cidr: str) -> dict[str, Any]:
        """Address and mask as the kernel reads them: network order in a u32."""
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version != 4:
            raise Punt(f"RBAC source CIDR {cidr}: IPv6")
        return {"kind": bs.RK_SRC_CIDR,
                "method": int.from_bytes(net.network_address.packed, "little"),
                "method_len": int.from_bytes(net.netmask.packed, "little")}

    def _method_atom(self, method: str) -> dict[str, Any]:
        if len(method) > 8 or not method.isupper() or not method.isalpha():
            raise Punt(f"RBAC method {method!r}")
        return {"kind": bs.RK_METHOD, "method_len": len(method),
                "method": int.from_bytes(method.encode().ljust(8, b"\0"), "little")}

    def _header_atom(self, h: HeaderMatch) -> dict[str, Any]:
        if h.name == ":method" and h.match is not None and h.match.kind is StringKind.EXACT \
                and not (h.invert or h.absent or h.match.ignore_case):
            return self._method_atom(h.match.value)
        hm = self._hmatch(h)
        self.feats.add("hdr_match")
        return {"kind": bs.RK_HEADER, "m": hm.f}

    def _domains(self, vhosts: tuple[VirtualHost, ...], base: int) -> list[_Row]:
        """Domain rows in the reference's order: exact, suffix and prefix wildcards
        longest first, "*"; ties keep plan order (the first vhost wins)."""
        ranked = []
        for vi, vh in enumerate(vhosts):
            for d in vh.domains:
                d = d.lower()
                if d == "*":
                    kind, s, rank = bs.DOM_ANY, "", 1
                elif d.startswith("*"):
                    kind, s, rank = bs.DOM_SUFFIX, d[1:], 3
                    self.feats.add("wildcard")
                elif d.endswith("*"):
                    kind, s, rank = bs.DOM_PREFIX, d[:-1], 2
                    self.feats.add("wildcard")
                else:
                    kind, s, rank = bs.DOM_EXACT, d, 4
                ranked.append(((-rank, -len(d)), kind, self._str(s), base + vi))
        if len(ranked) > MAX_DOMAINS_CAP:
            raise Punt(f"more than {MAX_DOMAINS_CAP} domains")
        ranked.sort(key=lambda x: x[0])
        return [_Row("Domain", {"kind": k, "vhost": v, "s": (s, True)}) for _, k, s, v in ranked]

    def _shadowed(self, r: Route, by: Route) -> None:
        """KERNEL route `r` after route `by`, whose kernel punt catches every
        request (no part of its matcher but prefix "" or "/" is evaluated in
        the kernel, e.g. "/" plus an :authority matcher): the kernel never
        runs it (executable_plan makes it ENVOY, so Envoy keeps its limiter
        and the split does not claim it)."""
        self.kernel_routes.discard(id(r))
        self.punt_reasons[id(r)] = f"after route {by.name!r}, whose kernel punt catches every request"

    def _limit_shared(self, r: Route, punts: list[tuple[Route, RouteMatch]]) -> None:
        """KERNEL route `r` with a rate limit after punt entries: one whose
        kernel matcher may match a request of `r` (synth_punt.disjoint says
        not disjoint) may hand Envoy a request that Envoy then routes to `r`
        (the punt evaluates only part of its route's matcher, or Envoy's
        route has a part the IR does not hold): `r`'s bucket would be
        bypassed (DESIGN.md rule 3), so Envoy keeps it (executable_plan)."""
        by = next((p for p, km in punts if not disjoint(km, r.match)), None)
        if r.rate_limit is not None and by is not None and id(r) in self.kernel_routes:
            self.kernel_routes.discard(id(r))
            self.punt_reasons[id(r)] = (f"rate limit after route {by.name!r}, whose kernel punt "
                                        "may hand Envoy requests of this route")

    def _punted(self, vhosts: Any, why: str, skip: int = 0) -> None:
        """Note why the routes of ``vhosts`` (after the first ``skip``) reach Envoy."""
        for vh in vhosts:
            for r in vh.routes[skip:]:
                self.punt_reasons.setdefault(id(r), why)

    def _vhost(self, lp: ListenerPlan, vh: VirtualHost) -> None:
        rbase = len(self.rows.get("l7fp_routes", []))
        routes = vh.routes
        if len(routes) > MAX_ROUTES_CAP:  # the rest of the vhost: one catch-all punt
            self.notes.append(f"vhost {lp.name}/{vh.name}: routes after the "
                              f"{MAX_ROUTES_CAP - 1}th go to Envoy")
            self._punted((vh,), f"more than {MAX_ROUTES_CAP - 1} routes in a virtual host",
                         skip=MAX_ROUTES_CAP - 1)
            routes = routes[:MAX_ROUTES_CAP - 1]
        n = len(routes) + (len(routes) < len(vh.routes))
        self._add("l7fp_vhosts", _Row("Vhost", {"route_base": rbase, "n_routes": n}))
        self.max_routes = max(self.max_routes, n)
        caught: Route | None = None  # its kernel punt catches every request: later ones never run
        punts: list[tuple[Route, RouteMatch]] = []  # earlier inexact punt entries, their matchers
        for r in routes:
            rid = len(self.route_names)
            self.route_names.append(f"{lp.name}/{vh.name}/{r.name}")
            self.routes.append(r)
            try:
                f = self._punt(r) if r.verdict is Verdict.ENVOY else self._route(vh, r)
                if r.verdict is Verdict.KERNEL:
                    self.kernel_routes.add(id(r))
            except Punt as e:
                self.notes.append(f"route {lp.name}/{vh.name}/{r.name}: {e}")
                self.punt_reasons[id(r)] = str(e)
                f = self._punt(r)
            if caught and id(r) in self.kernel_routes:
                self._shadowed(r, caught)
            self._limit_shared(r, punts)
            caught = caught or (r if _catches_all(f) else None)
            if "kernel_match" in f:
                punts.append((r, f.pop("kernel_match")))
            f["route_id"] = rid
            if "rw" in f:
                self.rewrites[rid] = f.pop("rw")
            self._place_queries(rid, f.pop("q_rows", []))
            self._note_timeout(rid, r, f)
            self._add("l7fp_routes", _Row("Route", f))
        if len(routes) < len(vh.routes):
            self.route_names.append(f"{lp.name}/{vh.name}/(more routes)")
            self.routes.append(None)
            self._add("l7fp_routes", _Row("Route", {
                "route_id": len(self.route_names) - 1, "action": bs.ACT_PUNT,
                "path_kind": bs.PATH_PREFIX, "path": ("", False)}))

    def _note_timeout(self, rid: int, r: Route, f: dict[str, Any]) -> None:
        """A forwarded route's timeout, for the data path's timer (dp_rto)."""
        ms = getattr(r.action, "timeout_ms", None)
        if ms and f.get("action") != bs.ACT_PUNT:
            self.route_timeouts[rid] = int(ms)

    def _punt(self, r: Route) -> dict[str, Any]:
        """A punt entry: the part of the route's matcher the kernel evaluates
        (fastpath.synth_punt: requests that fail it cannot match the route
        and go on to later routes), else one that catches everything. Its
        matcher is left in "kernel_match" for _vhost."""
        km = kernel_part(self, r.match)
        if not is_exact(km, r.match) and _any_path(km):  # e.g. "/" + :authority: Envoy
            km = CATCH_ALL  # may go on, the kernel never does (later routes: _shadowed)
        try:
            f = self._match(km)
        except Punt:  # a conjunct that builds alone but not with the others
            km = CATCH_ALL
            f = {"action": bs.ACT_PUNT, "path_kind": bs.PATH_PREFIX, "path": ("", False),
                 "hm_rows": []}
        f["action"] = bs.ACT_PUNT
        if not is_exact(km, r.match):  # Envoy may route some of its requests on (_vhost)
            f["kernel_match"] = km
        return self._with_hm(f)

    def _route(self, vh: VirtualHost, r: Route) -> dict[str, Any]:
        f = self._match(r.match)
        self._action(vh, r, f)
        return self._with_hm(f)

    def _with_hm(self, f: dict[str, Any]) -> dict[str, Any]:
        hm_rows = f.pop("hm_rows")
        f["hm_base"] = len(self.rows.get("l7fp_hmatch", []))
        f["n_hm"] = len(hm_rows)
        for row in hm_rows:
            self._add("l7fp_hmatch", row)
        return f

    def _match(self, m: RouteMatch) -> dict[str, Any]:
        if m.grpc:
            raise Punt("grpc matcher")
        kinds = {PathKind.PREFIX: bs.PATH_PREFIX, PathKind.EXACT: bs.PATH_EXACT,
                 PathKind.PATH_SEPARATED_PREFIX: bs.PATH_SEP_PREFIX}
        ci = not m.case_sensitive
        path: str | synth_dfa.DfaRef
        if m.path_kind in kinds:
            kind, path = kinds[m.path_kind], m.path
        elif m.regex_literal is not None:
            kind, path, ci = bs.PATH_EXACT, m.regex_literal, False
        elif m.regex_prefix is not None:
            kind, path, ci = bs.PATH_PREFIX, m.regex_prefix, False
        elif m.regex_dfa is not None:
            kind, path = synth_dfa.PATH_DFA, self._dfa(m.regex_dfa)
        else:
            raise Punt("regex path")
        f: dict[str, Any] = {"path_kind": kind, "hm_rows": [], "path": path if isinstance(
            path, synth_dfa.DfaRef) else (self._str(path), ci)}
        for h in m.headers:
            if h.name == ":method":
                self._method(h, f)
            else:
                f["hm_rows"].append(self._hmatch(h))
        if len(f["hm_rows"]) > MAX_HMATCH_CAP:
            raise Punt(f"more than {MAX_HMATCH_CAP} header matchers")
        self.max_hm = max(self.max_hm, len(f["hm_rows"]))
        if f["hm_rows"]:
            self.feats.add("hdr_match")
        f["q_rows"] = [self._qmatch(q) for q in m.query_params]
        if len(f["q_rows"]) > MAX_QMATCH:
            raise Punt(f"more than {MAX_QMATCH} query parameter matchers")
        self.max_qm = max(self.max_qm, len(f["q_rows"]))
        return f

    def _qmatch(self, q: QueryParamMatch) -> _Row:
        """A query-parameter matcher (l7fp_query.h); the name is case-sensitive."""
        raw = q.name.encode()
        if not raw or len(raw) > MAX_QNAME or any(ch not in SAFE_TARGET or ch in "&=+?"
                                                  for ch in q.name):
            raise Punt(f"query parameter name {q.name!r}")
        sm = q.match
        kind = bs.SM_PRESENT if sm is None else _SM.get(sm.kind)
        if kind is None:
            raise Punt(f"query parameter matcher kind {sm.kind.value if sm else '?'}")
        value = sm.value if sm is not None else ""
        words = raw.ljust(16, b"\0")
        return _Row("Qmatch", {
            "kind": kind, "nlen": len(raw),
            "nw": [int.from_bytes(words[:8], "little"), int.from_bytes(words[8:], "little")],
            "nm": [(1 << (8 * min(8, len(raw)))) - 1, (1 << (8 * max(0, len(raw) - 8))) - 1],
            "v": (self._str(value), bool(sm and sm.ignore_case))})

    def _place_queries(self, rid: int, rows: list[_Row]) -> None:
        """Matcher j of route `rid` goes to entry rid * L7FP_MAX_QMATCH + j (the
        table is filled with empty entries in build)."""
        if rows:
            self.feats.add("query")
            self.qrows[rid] = rows

    def query_table(self, stride: int, size: int) -> None:
        """Lay out l7fp_qmatch: `stride` (L7FP_MAX_QMATCH) entries per route,
        `size` (L7FP_N_QMATCH) in all. Written whole for every plan, also one
        without query matchers: the decision finds a route's matchers by its
        id, so an entry left from an older plan would be read as this one's.
        Called by synthesize once the knobs are final."""
        table = self.rows.setdefault("l7fp_qmatch", [])
        for rid in range(size // stride):
            got = self.qrows.get(rid, [])
            table.extend(got + [_Row("Qmatch", {})] * (stride - len(got)))

    def _method(self, h: HeaderMatch, f: dict[str, Any]) -> None:
        sm = h.match
        if (sm is None or sm.kind is not StringKind.EXACT or sm.ignore_case or h.invert
                or h.absent or len(sm.value) > 8 or not sm.value.isupper() or f.get("method_len")):
            raise Punt(":method matcher other than one exact upper-case method")
        f["method"] = int.from_bytes(sm.value.encode().ljust(8, b"\0"), "little")
        f["method_len"] = len(sm.value)

    def _hmatch(self, h: HeaderMatch) -> _Row:
        sm = h.match
        kind = bs.SM_PRESENT if sm is None else _SM.get(sm.kind)
        if sm is not None and sm.kind in (StringKind.CONTAINS, StringKind.REGEX):
            return self._hmatch_dfa(h)
        if kind is None:
            raise Punt(f"header matcher kind {sm.kind.value if sm else '?'}")
        flags = (bs.HM_INVERT * h.invert) | (bs.HM_ABSENT * h.absent) | (
            bs.HM_MISSING_EMPTY * h.treat_missing_as_empty)
        if h.absent and sm is not None:
            raise Punt("absent header matcher with a value")
        value = sm.value if sm is not None else ""
        return _Row("Hmatch", {"slot": self._slot(h.name), "kind": kind, "flags": flags,
                               "v": (self._str(value), bool(sm and sm.ignore_case))})

    def _hmatch_dfa(self, h: HeaderMatch) -> _Row:
        """A contains / safe_regex header matcher: a full-match DFA over the value."""
        assert h.match is not None
        m = self._dfa_m(h.match)
        if h.absent:
            raise Punt("absent header matcher with a value")
        flags = (bs.HM_INVERT * h.invert) | (bs.HM_MISSING_EMPTY * h.treat_missing_as_empty)
        return _Row("Hmatch", {"slot": self._slot(h.name), "flags": flags, **m})

    def _dfa_m(self, sm: Any) -> dict[str, Any]:
        """Matcher fields (kind, v) of a contains / safe_regex string matcher."""
        try:
            return {"kind": synth_dfa.SM_DFA, "v": self._dfa(synth_dfa.header_dfa(sm))}
        except synth_dfa.DfaPunt as e:
            raise Punt(str(e)) from e

    def _dfa(self, dfa: Any) -> synth_dfa.DfaRef:
        """The l7fp_dfas entry of `dfa` (shared by equal automata)."""
        try:
            data = synth_dfa.encode(dfa)
        except synth_dfa.DfaPunt as e:
            raise Punt(str(e)) from e
        self.feats.add("dfa")
        rows = self.rows.setdefault("l7fp_dfas", [])
        for i, r in enumerate(rows):
            if r.f["raw"] == data:
                return synth_dfa.DfaRef(i)
        rows.append(_Row("raw", {"raw": data}))
        return synth_dfa.DfaRef(len(rows) - 1)

    def _action(self, vh: VirtualHost, r: Route, f: dict[str, Any]) -> None:
        a = r.action
        if r.fault_abort is not None:
            if r.fault_abort.header_controlled:
                raise Punt("header-controlled fault")
            f["fault_status"] = r.fault_abort.status
            f["fault_per_million"] = r.fault_abort.per_million
            f["fault_reply"] = self._reply(r.fault_abort.status, FAULT_BODY)
            self.feats.add("fault")
        if r.rate_limit is not None:
            f["bucket"] = self._bucket(r.rate_limit) + 1
        if isinstance(a, DirectResponse):
            f["action"], f["status"], f["reply"] = bs.ACT_REPLY, a.status, self._reply(a.status, a.body)
            return
        if isinstance(a, Redirect):
            self._redirect(a, f)
            return
        if a.host_rewrite is not None or a.cluster_header:
            raise Punt("host rewrite or cluster_header")
        if a.prefix_rewrite:  # the same data path as a regex rewrite's (dp_rewrite.h)
            rw = prefix_rewrite(r.match, a.prefix_rewrite)
            if rw is None or a.path_rewrite is not None:
                raise Punt(f"prefix_rewrite {a.prefix_rewrite!r} the kernel does not write")
            f["rw"] = self._rewrite(r, a, rw)
        if a.path_rewrite is not None:
            f["rw"] = self._rewrite(r, a, a.path_rewrite)
        ids = []
        for wc in a.clusters:
            c = self.plan.cluster(wc.name)
            if c is None or c.verdict is Verdict.ENVOY or c.tls:
                raise Punt(f"cluster {wc.name} is not served by the kernel")
            ids.append(self.cluster_ids[wc.name])
        f["action"] = bs.ACT_FORWARD
        total = sum(wc.weight for wc in a.clusters)
        if len(a.clusters) == 1 or total <= 0:
            f["cluster"] = ids[0]
        else:
            if len(ids) > MAX_WEIGHTED_CAP:
                raise Punt(f"more than {MAX_WEIGHTED_CAP} weighted clusters")
            self.feats.add("weighted")
            self.max_wc = max(self.max_wc, len(ids))
            f["cluster"], f["n_wc"], f["total_weight"] = len(self.rows.get("l7fp_weighted", [])), len(ids), total
            cum = 0
            for cid, wc in zip(ids, a.clusters, strict=True):
                cum += wc.weight
                self._add("l7fp_weighted", _Row("Weighted", {"cluster": cid, "cum_weight": cum}))
        self._header_adds(vh, r, f)

    def _rewrite(self, r: Route, a: ClusterAction, rw: PathRewrite) -> bytes:
        """The dp_rw entry of a route with a PathRewrite (bpf_src/dp_rewrite.h).
        A shadow's path and a held request are not measured with a rewrite:
        those routes stay Envoy's."""
        if a.mirrors or r.fault_delay is not None:
            raise Punt("path rewrite with a mirror or a fault delay")
        return rewrite_kernel.entry(rw, self._slot(ORIGINAL_PATH, exact=False))

    def _redirect(self, a: Redirect, f: dict[str, Any]) -> None:
        """A REPLY with a placeholder the data path never sends: dp_redir.h pops the
        request and the agent answers with the Location (fastpath.agent_redirect)."""
        if a.status not in (301, 302, 303, 307, 308):
            raise Punt(f"redirect status {a.status}")
        f["action"], f["status"] = bs.ACT_REPLY, a.status
        f["reply"] = self._reply(a.status, "", (("x-l7fp-redirect", "placeholder"),))

    def _header_adds(self, vh: VirtualHost, r: Route, f: dict[str, Any]) -> None:
        """Route then virtual-host header adds (Envoy applies both). A name set
        with append=false, or removed, must be absent from the request."""
        adds = r.request_headers_to_add + vh.request_headers_to_add
        removes = r.request_headers_to_remove + vh.request_headers_to_remove
        if not adds and not removes:
            return
        absent = tuple(sorted({self._slot(h.name, exact=False) for h in adds if not h.append}
                              | {self._slot(n, exact=False) for n in removes}))
        if len(absent) > 4:
            raise Punt("more than 4 header names to set or remove")
        data = b"".join(f"{h.name}: {h.value}\r\n".encode() for h in adds)
        for h in adds:
            if any(ch in h.name + h.value for ch in "\r\n\0"):
                raise Punt("header value with CR/LF/NUL")
        self.feats.add("hdr_add")
        f["hdr_add"] = self._blob("l7fp_hdradds", data, absent) + 1

    def _reply(self, status: int, body: str, headers: tuple[tuple[str, str], ...] = ()) -> int:
        """Replies come in pairs: the response at an even index, the same
        response without its body (for HEAD, as Envoy sends it) right after."""
        full = reply_bytes(status, body, headers)
        lst = self.blobs.setdefault("l7fp_replies", [])
        if (full, ()) in lst:
            return lst.index((full, ()))
        lst.append((full, ()))
        lst.append((full[:full.index(b"\r\n\r\n") + 4], ()))
        return len(lst) - 2

    def _bucket(self, lim: LocalRateLimit) -> int:
        self.feats.add("rate_limit")
        enforce = lim.enforced_per_million
        return self._add("l7fp_buckets", _Row("Bucket", {
            "max_tokens": lim.max_tokens, "tokens_per_fill": lim.tokens_per_fill,
            "fill_interval_ns": lim.fill_interval_ms * 1_000_000, "status": lim.status,
            "reply": self._reply(lim.status, RATE_LIMITED_BODY, lim.response_headers),
            "enforce_per_million": enforce}))

    # ---- sizes and encoding ----
    def knobs(self, max_hdr: int) -> dict[str, int]:
        """Loop bounds and table sizes, rounded up (with floors) so that similar
        plans share one compiled program."""
        n = {t: len(v) for t, v in self.rows.items()}
        nb = {t: len(v) for t, v in self.blobs.items()}
        longest_blob = max((len(d) for v in self.blobs.values() for d, _ in v), default=1)
        k = {
            "L7FP_MAX_HDR": _pow2(max_hdr, 64),
            "L7FP_MAX_STR": _pow2(self.longest, 32),
            "L7FP_MAX_BLOB": _pow2(longest_blob, 256),
            "L7FP_MAX_DOMAINS": _pow2(self.max_dom, 8),
            "L7FP_MAX_ROUTES": _pow2(self.max_routes, 8),
            "L7FP_MAX_HMATCH": _pow2(self.max_hm, 1),
            "L7FP_MAX_WEIGHTED": _pow2(self.max_wc, 2),
            "L7FP_MAX_SLOTS": MAX_SLOTS,
            "L7FP_MAX_ABSENT": 4,
            "L7FP_MAX_RBAC": _pow2(self.max_rbac, 16),
            "L7FP_N_RBAC": _pow2(n.get("l7fp_rbac", 0), 16),
            "L7FP_N_LISTENERS": _pow2(n.get("l7fp_listeners", 0), 16),
            "L7FP_N_DOMAINS": _pow2(n.get("l7fp_domains", 0), 16),
            "L7FP_N_VHOSTS": _pow2(n.get("l7fp_vhosts", 0), 16),
            "L7FP_N_ROUTES": _pow2(n.get("l7fp_routes", 0), 16),
            "L7FP_N_HMATCH": _pow2(n.get("l7fp_hmatch", 0), 16),
            "L7FP_N_WEIGHTED": _pow2(n.get("l7fp_weighted", 0), 16),
            "L7FP_N_CLUSTERS": _pow2(n.get("l7fp_clusters", 0), 16),
            "L7FP_N_REPLIES": _pow2(nb.get("l7fp_replies", 0), 16),
            "L7FP_N_HDRADDS": _pow2(nb.get("l7fp_hdradds", 0), 16),
            "L7FP_N_BUCKETS": _pow2(n.get("l7fp_buckets", 0), 16),
            "L7FP_N_DFAS": _pow2(n.get("l7fp_dfas", 0), 4),
        }
        # one or two matchers per route slot: the verifier walks each slot of
        # every route (a second one costs ~100 k instructions at the caps)
        k["L7FP_MAX_QMATCH"] = self.max_qm
        k["L7FP_N_QMATCH"] = k["L7FP_N_ROUTES"] * self.max_qm
        for feat in ("hdr_match", "weighted", "rate_limit", "fault", "wildcard", "hdr_add", "rbac",
                     "dfa", "query", "long_names", "least_request"):
            k[f"L7FP_F_{feat.upper()}"] = int(feat in self.feats)
        if self.rewrites:
            k["DP_REWRITE"] = 1  # the data path's bpf_src/dp_rewrite.h
            # its rewritten path is built past the head's copy (dp_rewrite.h)
            k["L7FP_MAX_HDR"] = max(k["L7FP_MAX_HDR"], rewrite_kernel.MIN_MAX_HDR)
        return k

    def encode(self, st: bs.Structs) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for table, rows in self.rows.items():
            out[table] = [bytes(self._struct(st, row)) for row in rows]
        for table, blobs in self.blobs.items():
            out[table] = [bytes(self._blob_struct(st, d, a)) for d, a in blobs]
        return out

    def _struct(self, st: bs.Structs, row: _Row) -> Any:
        if row.kind == "raw":  # already encoded (l7fp_dfas)
            return row.f["raw"]
        cls = getattr(st, row.kind, None) or getattr(bs, row.kind)
        v = cls()
        self._fill(st, v, row.f)
        return v

    def _fill(self, st: bs.Structs, v: Any, f: dict[str, Any]) -> None:
        for name, val in f.items():
            if isinstance(val, synth_dfa.DfaRef):  # a string field carrying a DFA index
                s = encode_str(st, "", False)
                s.len = val.index
                setattr(v, name, s)
            elif isinstance(val, tuple):  # (string, case-insensitive)
                setattr(v, name, encode_str(st, val[0], val[1]))
            elif isinstance(val, dict):  # a nested struct (l7fp_rbac_row.m)
                self._fill(st, getattr(v, name), val)
            elif isinstance(val, list):  # an array of integers (l7fp_qmatch.nw)
                getattr(v, name)[:] = val
            else:
                setattr(v, name, val)

    def _blob_struct(self, st: bs.Structs, data: bytes, absent: tuple[int, ...]) -> ctypes.Structure:
        v = st.Blob()
        if len(data) > len(v.b):
            raise ValueError(f"blob of {len(data)} bytes over L7FP_MAX_BLOB")
        v.len = len(data)
        v.n_absent = len(absent)
        for i, s in enumerate(absent):
            v.absent[i] = s
        ctypes.memmove(ctypes.addressof(v) + type(v).b.offset, data, len(data))
        return v


__all__ = ["TableBuilder", "struct"]
