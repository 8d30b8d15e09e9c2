"""fastpath.hop: Envoy's hop-by-hop rule as measured, the kernel's rule held to it,
the reference model's data-path step and the split's matcher rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastpath.classify_match import header_match
from fastpath.hop import envoy_hop, kernel_hop
from fastpath.plan import (
    ClusterAction,
    DirectResponse,
    KernelPlan,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, decide_datapath
from tests.split.harness import listener_plan

# Measured on Envoy 1.40 (echo upstream, /tmp experiment written up in
# docs/fastpath.md): request headers -> (closes, what the upstream got).
MEASURED = [
    ((("connection", "keep-alive"),), False, ()),
    ((("connection", "Keep-Alive"), ("keep-alive", "timeout=5, max=100")), False, ()),
    ((("connection", "close"),), True, ()),
    ((("connection", "CLOSE"),), True, ()),
    ((("connection", "foo,close"),), True, ()),
    ((("connection", "keep-alive"), ("connection", "close")), True, ()),
    ((("proxy-connection", "Close"),), True, ()),
    ((("proxy-connection", "x-foo"), ("x-foo", "1")), False, (("x-foo", "1"),)),
    ((("connection", "x-foo"), ("x-foo", "bar"), ("x-bar", "1")), False, (("x-bar", "1"),)),
    ((("connection", "X-Foo"), ("x-foo", "1")), False, ()),
    ((("te", "trailers"),), False, (("te", "trailers"),)),
    ((("te", "Trailers"),), False, ()),
    ((("te", "gzip"),), False, ()),
    ((("te", "gzip, trailers"),), False, (("te", "trailers"),)),
    ((("te", "trailers;q=0.5"),), False, ()),
    ((("te", "gzip"), ("te", "trailers")), False, (("te", "trailers"),)),
    ((("te", ""),), False, (("te", ""),)),
    ((("connection", "TE"), ("te", "trailers")), False, (("te", "trailers"),)),
    ((("keep-alive", "xyz"),), False, ()),
]


def test_envoy_rule_reproduces_the_measurements() -> None:
    for headers, closes, forwarded in MEASURED:
        out = envoy_hop(headers)
        assert (out.closes, out.headers) == (closes, forwarded), headers


NAMES = st.sampled_from(["connection", "keep-alive", "proxy-connection", "te", "x-foo", "accept"])
VALUES = st.sampled_from(["keep-alive", "Keep-Alive", "close", "x-foo", "trailers", "gzip",
                          "keep-alive, close", "5", "TRAILERS", ""])


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_kernel_keeps_only_what_it_forwards_as_envoy(headers: list[tuple[str, str]]) -> None:
    hs = tuple(headers)
    why, kept = kernel_hop(hs)
    env = envoy_hop(hs)
    if why == "":
        assert not env.closes and kept == env.headers, (hs, kept, env)
    if env.closes:
        assert why == "conn_close" or why == "hop_header", hs


def _plan() -> KernelPlan:
    routes = (Route("up", RouteMatch(PathKind.PREFIX, "/u"),
                    ClusterAction((WeightedCluster("c", 1),)), Verdict.KERNEL),
              Route("d", RouteMatch(PathKind.PREFIX, "/d"), DirectResponse(200, "hi"),
                    Verdict.KERNEL),
              Route("lim", RouteMatch(PathKind.PREFIX, "/l"), DirectResponse(429, "no"),
                    Verdict.KERNEL))
    return listener_plan(routes)


def test_reference_datapath_step() -> None:
    def dd(path: str, *hs: tuple[str, str]) -> tuple[str, str, tuple[str, ...]]:
        d = decide_datapath(_plan(), "l", Request("GET", path, "a", tuple(hs)))
        return d.kind, d.reason, d.hop_removed

    assert dd("/u") == ("forward", "", ())
    assert dd("/u", ("connection", "keep-alive"), ("keep-alive", "5")) == \
        ("forward", "", ("connection", "keep-alive"))
    assert dd("/u", ("connection", "close")) == ("envoy", "conn_close", ())
    assert dd("/d", ("connection", "close")) == ("envoy", "conn_close", ())
    assert dd("/d", ("connection", "keep-alive")) == ("reply", "", ())
    assert dd("/l", ("connection", "close"))[0] == "reply"  # a 429 stays in the kernel
    assert dd("/u", ("te", "gzip")) == ("envoy", "hop_header", ())
    assert dd("/u", ("te", "trailers")) == ("forward", "", ())


def test_split_punts_matchers_on_removed_headers() -> None:
    for name in ("connection", "Keep-Alive", "proxy-connection"):
        _, reasons = header_match({"name": name, "presentMatch": True})
        assert any("hop-by-hop" in r for r in reasons), name
    _, reasons = header_match({"name": "te", "exactMatch": "trailers"})
    assert reasons == []
