"""The data path's second decision (l7fp_decide_again): a client's request,
forwarded by its outbound listener, decided once more with the destination's
inbound listener merged into the same tables (fastpath.inbound_merge). It
must give what l7fp_decide gives on that listener for the same bytes (same
parse, no second parse): RBAC 403, fault abort, direct response, header add,
forward, punt."""

from __future__ import annotations

import pytest

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath.inbound_merge import merge, merged_name
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram

pytestmark = [pytest.mark.kernel]

DST = "198.18.0.9"
APP = "inbound|9000||"


def _fwd(cluster: str, name: str, path: str = "/", **kw: object) -> P.Route:
    return P.Route(name, P.RouteMatch(P.PathKind.PREFIX, path),
                   P.ClusterAction((P.WeightedCluster(cluster, 1),)), P.Verdict.KERNEL,
                   **kw)  # type: ignore[arg-type]


def _plans() -> tuple[P.KernelPlan, P.KernelPlan]:
    out_vh = P.VirtualHost("api", ("*",), (_fwd("out", "all"),))
    out = P.ListenerPlan("198.19.0.9_9000", "198.19.0.9", 9000, P.Direction.OUTBOUND, (out_vh,))
    client = P.KernelPlan("client", "c1", (out,), (P.Cluster(
        "out", P.LbPolicy.ROUND_ROBIN, (P.Endpoint(DST, 9000),)),))
    deny = P.Rbac("DENY", (P.RbacPolicy("no-admin", ((P.Permission(headers=(
        P.HeaderMatch("x-admin"),)),),), ((P.Principal(any=True),),)),))
    in_vh = P.VirtualHost("inbound|http|9000", ("*",), (
        P.Route("direct", P.RouteMatch(P.PathKind.PREFIX, "/direct"), P.DirectResponse(200, "in\n"),
                P.Verdict.KERNEL),
        _fwd(APP, "fault", "/fault", fault_abort=P.FaultAbort(503)),
        _fwd(APP, "punt", "/punt", rate_limit=P.LocalRateLimit(1, 1, 1000)),
        _fwd(APP, "hdr", "/", request_headers_to_add=(P.HeaderValue("x-in", "1", append=False),)),
    ))
    inbound = P.ListenerPlan("virtualInbound", "0.0.0.0", 9000, P.Direction.INBOUND, (in_vh,),
                             route_config=APP, rbac=deny, rbacs=(deny,))
    dest = P.KernelPlan("dest", "d1", (inbound,), (P.Cluster(
        APP, P.LbPolicy.ROUND_ROBIN, (P.Endpoint("127.0.0.1", 9000),)),))
    return client, dest


REQS = [b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n",
        b"HEAD /x HTTP/1.1\r\nHost: api\r\nX-Admin: 1\r\n\r\n",
        b"GET /direct HTTP/1.1\r\nHost: api\r\n\r\n",
        b"GET /fault/1 HTTP/1.1\r\nHost: api\r\n\r\n",
        b"POST /punt HTTP/1.1\r\nHost: api\r\ncontent-length: 2\r\n\r\nab",
        b"GET /x HTTP/1.1\r\nHost: api\r\nx-in: 0\r\n\r\n"]
EXPECT = [(bs.FORWARD, 0), (bs.REPLY, 403), (bs.REPLY, 200), (bs.REPLY, 503), (bs.PASS, 0),
          (bs.PASS, 0)]  # the last: x-in is set by the route and already present -> Envoy


def test_second_decision_equals_a_decision_on_the_inbound_listener() -> None:
    from support.env import require_kernel

    require_kernel()
    client, dest = _plans()
    merged = merge(client, lambda ip: dest if ip == DST else None)
    sp = synthesize(merged.plan)
    prog = DecideProgram.get((*sp.cflags, "-DL7FP_TD_AGAIN=1"))
    prog.load(sp)
    out_lid, in_lid = sp.listener_ids["198.19.0.9_9000"], sp.listener_ids[merged_name(DST, 9000)]
    fields = ("verdict", "reason", "status", "reply", "hdr_add", "consumed", "hdr_len", "flags")
    for req, (verdict, status) in zip(REQS, EXPECT, strict=True):
        first = prog.run(req, listener=out_lid)
        assert first.verdict == bs.FORWARD, (req, first.verdict, first.reason)
        again = prog.run(req, listener=out_lid, again=in_lid + 1)
        alone = prog.run(req, listener=in_lid)
        got = {f: getattr(again, f) for f in fields}
        assert got == {f: getattr(alone, f) for f in fields}, req
        assert (again.verdict, again.status if again.verdict == bs.REPLY else 0) == \
            (verdict, status), (req, got)
        if verdict == bs.FORWARD:
            assert again.hdr_add, "the inbound route's header add"
