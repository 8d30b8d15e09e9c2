"""The pure parts of the route timer (fastpath.timeouts, NAME=timeout): which
records are due, the 504 bytes, the SOCK_DESTROY request layout, the route ids
the synthesis gives the timer, and the inbound rule (an inbound route timeout
is not the kernel's)."""

from __future__ import annotations

import socket
import struct
from types import SimpleNamespace

from fastpath.inbound import inbound_transparent
from fastpath.inbound_merge import merge, merged_name
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Direction,
    Endpoint,
    KernelPlan,
    LbPolicy,
    ListenerPlan,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    VirtualHost,
    WeightedCluster,
)
from fastpath.synth import synthesize
from fastpath.timeouts import destroy_msg, due, timeout_reply

DST = "198.18.0.9"


def rec(deadline: int, state: int = 2) -> SimpleNamespace:
    return SimpleNamespace(deadline_ns=deadline, client=7, state=state, route=3, cli_ip=1,
                           cli_port=2, dst_ip=3, dst_port=4)


def test_due_takes_passed_deadlines_only() -> None:
    records = [(10, rec(1_000)), (11, rec(2_000)), (12, rec(0, state=1))]  # 0: body coming
    assert [e.up for e in due(records, 1_500)] == [10]
    assert [e.up for e in due(records, 2_000)] == [10, 11]


def test_timeout_reply_is_envoys_local_reply() -> None:
    raw = timeout_reply("Thu, 26 Nov 2026 09:34:07 GMT")
    # a real Envoy 1.40 sent these bytes (plus `server: envoy`) for a 1 s route timeout
    assert raw == (b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 24\r\n"
                   b"content-type: text/plain\r\ndate: Thu, 26 Nov 2026 09:34:07 GMT\r\n\r\n"
                   b"upstream request timeout")


def test_destroy_request_layout() -> None:
    src = int.from_bytes(socket.inet_aton("198.18.0.2"), "little")
    dst = int.from_bytes(socket.inet_aton("198.19.0.9"), "little")
    msg = destroy_msg(src, 40000, dst, 9000, 0x1122334455667788)
    length, kind, flags = struct.unpack_from("=IHH", msg)
    assert length == len(msg) == 16 + 8 + 48 and kind == 21 and flags == 1 | 4
    assert msg[16] == socket.AF_INET and msg[17] == socket.IPPROTO_TCP
    sid = msg[24:]
    assert struct.unpack_from(">HH", sid) == (40000, 9000)
    assert sid[4:8] == socket.inet_aton("198.18.0.2") and sid[20:24] == socket.inet_aton("198.19.0.9")
    assert struct.unpack_from("=II", sid, 40) == (0x55667788, 0x11223344)


def _route(name: str, cluster: str, timeout: int | None, verdict: Verdict = Verdict.KERNEL,
           prefix: str = "/") -> Route:
    return Route(name, RouteMatch(PathKind.PREFIX, prefix),
                 ClusterAction((WeightedCluster(cluster, 1),), timeout_ms=timeout), verdict)


def client() -> KernelPlan:
    vh = VirtualHost("api", ("*",), (_route("t", "out", 1000, prefix="/t"),
                                     _route("punt", "out", 2000, Verdict.ENVOY, "/p"),
                                     _route("none", "out", None)))
    lp = ListenerPlan("198.19.0.9_9000", "198.19.0.9", 9000, Direction.OUTBOUND, (vh,))
    return KernelPlan("client", "v1", (lp,), (Cluster("out", LbPolicy.ROUND_ROBIN,
                                                      (Endpoint(DST, 9000),)),))


def test_synthesis_gives_the_timer_kernel_routes_only() -> None:
    sp = synthesize(client())
    names = {sp.route_names[i].rsplit("/", 1)[-1]: ms for i, ms in sp.route_timeouts.items()}
    assert names == {"t": 1000}  # a punt route's timeout is Envoy's


def dest(timeout: int | None) -> KernelPlan:
    vh = VirtualHost("inbound|http|9000", ("*",), (_route("in", "inbound|9000||", timeout),))
    lp = ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND, (vh,),
                      route_config="inbound|9000||")
    return KernelPlan("dest", "d1", (lp,), (Cluster("inbound|9000||", LbPolicy.ROUND_ROBIN,
                                                    (Endpoint("127.0.0.1", 9000),)),))


def test_inbound_route_timeout_is_a_punt() -> None:
    assert inbound_transparent(dest(None).listeners, 9000)
    assert not inbound_transparent(dest(5000).listeners, 9000)
    got = merge(client(), lambda ip: dest(5000))
    lp = next(lp for lp in got.plan.listeners if lp.name == merged_name(DST, 9000))
    r = lp.virtual_hosts[0].routes[0]
    assert r.verdict is Verdict.ENVOY and "inbound route timeout" in r.reason
