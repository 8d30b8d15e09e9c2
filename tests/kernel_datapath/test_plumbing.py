"""Socket plumbing on loopback (K2, step 1): sock_ops -> SOCKHASH, sk_msg redirect
to a pooled upstream socket, sk_skb response into the client, kernel reply into
the sender's own ingress, SK_PASS to a real Envoy, sticky hand-over.

The client runs in a scoped cgroup v2 directory; its connection goes to the
real Envoy's listener (the slow path), like an intercepted mesh connection.
"""

from __future__ import annotations

import json
import socket

import pytest
from k2_helpers import HttpServer, ScopedCgroup, client_cmd

from fastpath import bpfsys
from fastpath.loader import K_FORWARD, K_PASS, K_REPLY, Datapath

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

DENY_BODY = b"RBAC: access denied"
DENY = (b"HTTP/1.1 403 Forbidden\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n\r\n%s"
        % (len(DENY_BODY), DENY_BODY))


def get(path: str, extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n"


def setup_plan(dp: Datapath, envoy_port: int, upstream: HttpServer, n_up: int = 4
               ) -> list[socket.socket]:
    dp.set_service("127.0.0.1", envoy_port, 1)
    dp.set_inline_route(0, 0, K_FORWARD, "/fast", pool=0)
    dp.set_inline_route(0, 1, K_REPLY, "/deny", reply_id=0, status=403)
    dp.set_inline_route(0, 2, K_PASS, "/punt")
    dp.set_inline_vhost(0, 1, None, 0, 3)  # "*": every Host
    dp.set_reply(0, DENY)
    dp.ensure_pool(0, 64)
    ups = []
    for _ in range(n_up):
        s = socket.create_connection(("127.0.0.1", upstream.port))
        dp.push_free(0, dp.add_upstream(s))
        ups.append(s)
    dp.set_enabled(0)
    return ups


def run(cg: ScopedCgroup, port: int, script: list) -> list:  # type: ignore[type-arg]
    r = cg.run(client_cmd("127.0.0.1", str(port), json.dumps(script)))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def stats(dp: Datapath) -> dict[tuple[int, int, int], int]:
    return {(k.route, k.outcome, k.reason): sum(v) for k, v in dp.bpf["dp_stats"].items()}


def test_fast_reply_pass_and_back(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    out = run(cgroup, envoy.port, [[
        {"send": [get("/fast/a")]}, {"send": [get("/deny")]}, {"send": [get("/fast/b")]},
        {"send": [get("/other")]}, {"send": [get("/fast/c")]}]])[0]
    fast_a, deny, fast_b, other, fast_c = out
    # fast path: straight to the upstream, Envoy never added its header
    assert fast_a["status"] == 200 and fast_a["headers"]["x-served-by"] == "upstream"
    assert "x-via" not in fast_a["headers"]
    assert fast_b["status"] == 200 and "x-via" not in fast_b["headers"]
    # kernel reply: the upstream never saw the request
    assert deny["status"] == 403 and deny["body"] == DENY_BODY.decode()
    assert all("/deny" not in line for line in upstream.seen)
    # no route: Envoy, handed over at a request boundary; once Envoy's response
    # is through, the connection is the kernel's again (bpf_src/dp_return.h)
    assert other["headers"].get("x-via") == "envoy"
    assert "x-via" not in fast_c["headers"] and fast_c["headers"]["x-served-by"] == "upstream"
    st = stats(datapath)
    assert st[(1, 0, 0)] == 3 and st[(2, 1, 0)] == 1
    for s in ups:
        s.close()


def test_untracked_cgroup_is_untouched(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """Without the cgroup attachment every request goes the normal way (to Envoy)."""
    ups = setup_plan(datapath, envoy.port, upstream)
    out = run(cgroup, envoy.port, [[{"send": [get("/fast/a")]}]])[0]
    assert out[0]["headers"].get("x-via") == "envoy"
    assert stats(datapath) == {}
    for s in ups:
        s.close()


def test_punt_route_and_pool_empty_go_to_envoy(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    ups = setup_plan(datapath, envoy.port, upstream, n_up=1)
    datapath.attach_cgroup(cgroup.path)
    # two connections: the first binds the only pooled socket, the second finds the pool empty
    script = [[{"send": [get("/punt/x")]}], [{"send": [get("/fast/1")]}]]
    first = run(cgroup, envoy.port, script)
    assert first[0][0]["headers"].get("x-via") == "envoy"
    assert first[1][0]["headers"]["x-served-by"] == "upstream"
    assert "x-via" not in first[1][0]["headers"]
    for s in ups:
        s.close()


def test_pipelined_write_goes_to_envoy_in_order(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A write with several requests goes to Envoy as a whole (and the connection
    stays there), so no response overtakes another."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    out = run(cgroup, envoy.port, [
        [{"send": [get("/fast/1") + get("/fast/2")], "expect": 2}, {"send": [get("/fast/3")]}],
        [{"send": [get("/fast/4")]}, {"send": [get("/fast/5") + get("/deny")], "expect": 2}],
    ])
    pipe_first, pipe_later = out
    assert [json.loads(r["body"])["line"] for r in pipe_first] == [
        f"GET /fast/{i} HTTP/1.1" for i in (1, 2, 3)]
    assert [r["headers"].get("x-via") for r in pipe_first] == ["envoy"] * 3
    assert "x-via" not in pipe_later[0]["headers"]
    assert [json.loads(r["body"])["line"] for r in pipe_later[:2]] == [
        "GET /fast/4 HTTP/1.1", "GET /fast/5 HTTP/1.1"]
    assert pipe_later[1]["headers"].get("x-via") == "envoy"
    assert pipe_later[2]["status"] == 403 and pipe_later[2]["headers"].get("server") == "envoy"
    for s in ups:
        s.close()


def test_detach_leaves_nothing(datapath, cgroup):  # type: ignore[no-untyped-def]
    datapath.attach_cgroup(cgroup.path)
    mine = bpfsys.prog_id(datapath.fds["sockops"])
    assert mine in bpfsys.attached_prog_ids(str(cgroup.path))
    datapath.close()
    assert bpfsys.attached_prog_ids(str(cgroup.path)) == []



def test_inline_virtual_hosts_by_host(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """Built-in decision: exact Host (case-insensitive, with then without :port),
    else the "*" entry (here a punt), never another virtual host's routes."""
    datapath.set_service("127.0.0.1", envoy.port, 1)
    datapath.set_inline_route(0, 0, K_FORWARD, "/", pool=0)  # vhost "svc"
    datapath.set_inline_route(0, 1, K_PASS, "/")  # vhost "*": Envoy
    datapath.set_inline_vhost(0, 1, "svc", 0, 1)
    datapath.set_inline_vhost(0, 1, None, 1, 1)
    datapath.ensure_pool(0, 64)
    ups = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", upstream.port))
        datapath.push_free(0, datapath.add_upstream(s))
        ups.append(s)
    datapath.set_enabled(0)
    datapath.attach_cgroup(cgroup.path)
    hosts = ["svc", "SVC", "svc:9000", "other", "svcx", "sv"]
    out = run(cgroup, envoy.port, [[{"send": [f"GET /h HTTP/1.1\r\nHost: {h}\r\n\r\n"]}]
                                   for h in hosts])
    via = ["envoy" if r[0]["headers"].get("x-via") == "envoy" else "fast" for r in out]
    assert via == ["fast", "fast", "fast", "envoy", "envoy", "envoy"], via
    for s in ups:
        s.close()
