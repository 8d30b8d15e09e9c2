"""fastpath.synth without the kernel: flags, table rows, punt entries, notes."""

from __future__ import annotations

import ctypes

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath.synth import cclass_table, decide_text, name_key, reply_bytes, synthesize
from kernel_decide.plans import C1, C2, fwd, parser_plan, route


def _rows(sp, table, cls):  # type: ignore[no-untyped-def]
    return [cls.from_buffer_copy(r) for r in sp.rows[table]]


def test_flags_follow_the_plan() -> None:
    sp = synthesize(parser_plan())
    k = sp.knobs
    assert k["L7FP_F_HDR_MATCH"] == 0 and k["L7FP_F_RBAC"] == 0 and k["L7FP_F_WILDCARD"] == 1
    assert f"-DL7FP_MAX_HDR={k['L7FP_MAX_HDR']}" in sp.cflags
    assert all(f.startswith("-DL7FP_") for f in sp.cflags)


def test_domains_in_envoy_order() -> None:
    vh1 = P.VirtualHost("one", ("*", "b.*"), routes=(route("r", P.PathKind.PREFIX, "/", fwd("c1")),))
    vh2 = P.VirtualHost("two", ("*.x.com", "A.com", "*.com"),
                        routes=(route("r", P.PathKind.PREFIX, "/", fwd("c2")),))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh1, vh2))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2)))
    st = bs.structs(sp.knobs)
    doms = _rows(sp, "l7fp_domains", st.Domain)
    got = [(d.kind, bytes(d.s.b[:d.s.len]).decode(), d.vhost) for d in doms]
    assert got == [(bs.DOM_EXACT, "a.com", 1), (bs.DOM_SUFFIX, ".x.com", 1),
                   (bs.DOM_SUFFIX, ".com", 1), (bs.DOM_PREFIX, "b.", 0), (bs.DOM_ANY, "", 0)]


def test_punt_entries_keep_their_matcher_and_unsupported_parts_are_noted() -> None:
    vh = P.VirtualHost("v", ("*",), routes=(
        route("slow", P.PathKind.PREFIX, "/slow", fwd("c1"), verdict=P.Verdict.ENVOY),
        P.Route("q", P.RouteMatch(P.PathKind.PREFIX, "/q", query_params=(
            P.QueryParamMatch("a", P.StringMatch(P.StringKind.CONTAINS, "x")),)), fwd("c1"),
            P.Verdict.KERNEL),
        P.Route("rw", P.RouteMatch(P.PathKind.PREFIX, "/rw"),
                P.ClusterAction((P.WeightedCluster("c1", 1),), host_rewrite="up.test"), P.Verdict.KERNEL),
        route("rest", P.PathKind.PREFIX, "/", fwd("c2")),
    ))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1, C2)))
    st = bs.structs(sp.knobs)
    routes = _rows(sp, "l7fp_routes", st.Route)
    assert [r.action for r in routes] == [bs.ACT_PUNT, bs.ACT_PUNT, bs.ACT_PUNT, bs.ACT_FORWARD]
    assert bytes(routes[0].path.b[:routes[0].path.len]) == b"/slow"
    # a contains query matcher is left out of the punt entry, its path kept (synth_punt)
    assert bytes(routes[1].path.b[:routes[1].path.len]) == b"/q"
    assert bytes(routes[2].path.b[:routes[2].path.len]) == b"/rw"
    assert any("query" in n for n in sp.notes) and any("rewrite" in n for n in sp.notes)


def test_string_masks_and_keys() -> None:
    sp = synthesize(parser_plan())
    st = bs.structs(sp.knobs)
    r = _rows(sp, "l7fp_routes", st.Route)[0]
    assert r.path.len == 4 and r.path.m[0] == 0xFFFFFFFF and r.path.m[1] == 0
    assert name_key("Content-Length") == (14, int.from_bytes(b"content-", "little"),
                                          int.from_bytes(b"t-length", "little"), 0)
    assert name_key("baggage-user-agent", long_names=True)[3] == int.from_bytes(b"us", "little")
    assert name_key("baggage-user-agent")[3] == 0
    assert reply_bytes(404) == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    assert reply_bytes(403, "x") == (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 1\r\n"
                                     b"content-type: text/plain\r\n\r\nx")
    cc = cclass_table()
    assert cc[ord("%")] >> bs.C_TARGET & 1 == 0 and cc[ord("a")] >> bs.C_TCHAR & 1 == 1
    assert '#include "l7fp_' not in decide_text()  # pasted: BCC rewrites only the main text
    assert ctypes.sizeof(st.Str) == 16 + 2 * sp.knobs["L7FP_MAX_STR"]


def test_rbac_rows_nest() -> None:
    pol = P.RbacPolicy("p", permissions=((P.Permission(method="GET"),
                                          P.Permission(port=81, invert=True)),),
                       principals=((P.Principal(any=True),),))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(
        P.VirtualHost("v", ("*",), routes=(route("r", P.PathKind.PREFIX, "/", fwd("c1")),)),),
        rbac=P.Rbac("DENY", (pol,)))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1,)))
    st = bs.structs(sp.knobs)
    rows = [(r.kind, r.ends) for r in _rows(sp, "l7fp_rbac", st.RbacRow)]
    assert rows == [(bs.RK_METHOD, bs.RB_ITEM),
                    (bs.RK_FALSE, bs.RB_ITEM | bs.RB_INVERT | bs.RB_GROUP | bs.RB_SIDE),
                    (bs.RK_TRUE, bs.RB_ITEM | bs.RB_GROUP | bs.RB_SIDE | bs.RB_PRIN | bs.RB_FILTER)]
    lst = bs.Listener.from_buffer_copy(sp.rows["l7fp_listeners"][0])
    assert (lst.rbac_n, lst.rbac_nf, lst.rbac_deny, lst.order & 0xf) == (3, 1, 1, bs.FILT_RBAC)


def test_long_vhost_ends_in_a_catch_all_punt() -> None:
    from fastpath.synth import MAX_ROUTES_CAP

    routes = tuple(route(f"r{i}", P.PathKind.PREFIX, f"/p{i}", fwd("c1")) for i in range(20))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                        virtual_hosts=(P.VirtualHost("v", ("*",), routes=routes),))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(C1,)))
    st = bs.structs(sp.knobs)
    rows = _rows(sp, "l7fp_routes", st.Route)
    assert len(rows) == MAX_ROUTES_CAP and sp.knobs["L7FP_MAX_ROUTES"] == MAX_ROUTES_CAP
    assert [r.action for r in rows[:-1]] == [bs.ACT_FORWARD] * (MAX_ROUTES_CAP - 1)
    assert (rows[-1].action, rows[-1].path.len) == (bs.ACT_PUNT, 0)
    assert any("go to Envoy" in n for n in sp.notes)
