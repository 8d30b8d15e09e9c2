"""fastpath.rewrite (which regex_rewrite / prefix_rewrite forms the kernel
does) and their dp_rw entries (fastpath.rewrite_kernel), without Envoy or BPF.
What Envoy does with them: tests/split/test_rewrite_envoy.py."""

from __future__ import annotations

import ctypes

import pytest

from fastpath import plan as P
from fastpath.rewrite import path_rewrite, prefix_rewrite, rewritten
from fastpath.rewrite_kernel import WHOLE, DpRw, rows
from fastpath.synth import synthesize

PFX = P.RouteMatch(P.PathKind.PREFIX, "/hub/")
ROOT = P.RouteMatch(P.PathKind.PREFIX, "/")


@pytest.mark.parametrize("pattern,sub,match,want", [
    ("^/hub/(.*)", "/\\1", PFX, P.PathRewrite("/", 5, "", "^/hub/(.*)", "/\\1")),
    ("^/hub/(.*)$", "/x/\\1", ROOT, P.PathRewrite("/x/", 5, "/hub/", "^/hub/(.*)$", "/x/\\1")),
    ("^/foo.*$", "/", ROOT, P.PathRewrite("/", None, "/foo", "^/foo.*$", "/")),
    ("/.*", "/new", ROOT, P.PathRewrite("/new", None, "", "/.*", "/new")),
    ("^/hub", "/b", PFX, P.PathRewrite("/b", 4, "", "^/hub", "/b")),
])
def test_kernel_forms(pattern: str, sub: str, match: P.RouteMatch, want: P.PathRewrite) -> None:
    assert path_rewrite({"pattern": {"regex": pattern}, "substitution": sub}, match) == (want, [])


@pytest.mark.parametrize("pattern,sub,why", [
    ("/", "_", "not a whole-path or literal-prefix pattern"),
    ("^/z(.*)$", "\\0-\\1", "groups other than a final \\1"),
    ("^/foo.*", "/\\1", "\\1 without a (.*) group"),
    ("^/hub/(.*)", "\\1", "constant empty"),
    ("(?i)^/a(.*)", "/\\1", "not a whole-path"),
    ("^/a(.*)", "/a?b\\1", "bytes the kernel does not write"),
])
def test_envoy_forms_name_the_pattern(pattern: str, sub: str, why: str) -> None:
    rw, reasons = path_rewrite({"pattern": {"regex": pattern}, "substitution": sub}, PFX)
    assert rw is None and repr(pattern) in reasons[0] and why in reasons[0], reasons


def test_rewritten_keeps_the_query_and_unmatched_paths() -> None:
    rw = P.PathRewrite("/", 5, "/hub/")
    assert rewritten(rw, "/hub/a/b?c=/hub/") == "/a/b?c=/hub/"
    assert rewritten(rw, "/hubx?q") == "/hubx?q"
    assert rewritten(P.PathRewrite("/r"), "/a/b?x") == "/r?x"


def test_prefix_rewrite_and_the_dp_rw_entries() -> None:
    assert prefix_rewrite(P.RouteMatch(P.PathKind.PREFIX, "/api"), "/v2") == P.PathRewrite("/v2", 4)
    assert prefix_rewrite(P.RouteMatch(P.PathKind.EXACT, "/ex"), "/e") == P.PathRewrite("/e", None)
    assert prefix_rewrite(PFX, "") is None  # Envoy: no rewrite at all
    vh = P.VirtualHost("v", ("*",), routes=(
        P.Route("a", P.RouteMatch(P.PathKind.PREFIX, "/api"),
                P.ClusterAction((P.WeightedCluster("c1", 1),), prefix_rewrite="/v2"), P.Verdict.KERNEL),
        P.Route("b", ROOT, P.ClusterAction((P.WeightedCluster("c1", 1),),
                                           path_rewrite=P.PathRewrite("/", None, "/foo")),
                P.Verdict.KERNEL)))
    lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    c1 = P.Cluster("c1", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.2", 80),))
    sp = synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(c1,)))
    assert "-DDP_REWRITE=1" in sp.cflags and not sp.notes
    got = {rid: DpRw.from_buffer_copy(v) for rid, v in sp.rewrites.items()}
    a, b = got[0], got[1]
    assert (a.cut, a.check_len, bytes(a.value[:a.value_len])) == (4, 0, b"/v2")
    assert (b.cut, bytes(b.check[:b.check_len]), bytes(b.value[:b.value_len])) == (WHOLE, b"/foo", b"/")
    assert bytes(a.name[:a.name_len]) == b"x-envoy-original-path: "
    table = rows(sp.rewrites, sp.knobs["L7FP_N_ROUTES"], 1)
    assert len(table) == sp.knobs["L7FP_N_ROUTES"] and ctypes.sizeof(DpRw) == 192
    assert DpRw.from_buffer_copy(table[(sp.knobs["L7FP_N_ROUTES"] + 1).to_bytes(4, "little")]).on == 1


def test_suppressed_envoy_headers_keep_rewrites_envoys() -> None:
    """The kernel always sends x-envoy-original-path; with the router's
    suppress_envoy_headers Envoy may not (not measured): ENVOY."""
    from fastpath.classify_route import HttpFilter, RouteContext, classify_route

    c1 = P.Cluster("c1", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.2", 80),))
    for suppress in (False, True):
        ctx = RouteContext({"c1": c1}, [HttpFilter("router", "router", {"suppressEnvoyHeaders": suppress})])
        for rw in ({"prefixRewrite": "/v2"},
                   {"regexRewrite": {"pattern": {"regex": "^/a(.*)"}, "substitution": "/b\\1"}}):
            r = classify_route({"match": {"prefix": "/a"}, "route": {"cluster": "c1", "timeout": "0s", **rw}},
                               ctx)
            assert (r.verdict is P.Verdict.ENVOY) == suppress, (rw, r.reason)
            assert not suppress or "suppress_envoy_headers" in r.reason


def test_a_plan_with_rewrites_gets_a_head_buffer_the_rewritten_path_fits_past() -> None:
    """dp_rw_build writes the new path at L7FP_MAX_HDR, up to RW_MAX + RW_TARGET
    + 8 bytes, into a buffer of 2 * L7FP_MAX_HDR: with max_hdr=256 that wrapped
    onto the parsed request line. The synthesis raises the head size to 512;
    a plan without rewrites keeps the size asked for."""
    from fastpath.rewrite_kernel import MIN_MAX_HDR
    rw = P.Route("a", P.RouteMatch(P.PathKind.PREFIX, "/api"),
                 P.ClusterAction((P.WeightedCluster("c1", 1),), prefix_rewrite="/v2"),
                 P.Verdict.KERNEL)
    plain = P.Route("a", P.RouteMatch(P.PathKind.PREFIX, "/api"),
                    P.ClusterAction((P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL)
    c1 = P.Cluster("c1", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.2", 80),))

    def knobs(route: P.Route) -> dict[str, int]:
        lp = P.ListenerPlan("l", "0.0.0.0", 80, P.Direction.OUTBOUND,
                            virtual_hosts=(P.VirtualHost("v", ("*",), routes=(route,)),))
        return synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(c1,)), max_hdr=256).knobs
    assert MIN_MAX_HDR == 512 and 2 * MIN_MAX_HDR >= MIN_MAX_HDR + 64 + 256 + 8
    assert (knobs(rw)["DP_REWRITE"], knobs(rw)["L7FP_MAX_HDR"]) == (1, 512)
    assert "DP_REWRITE" not in knobs(plain) and knobs(plain)["L7FP_MAX_HDR"] == 256
