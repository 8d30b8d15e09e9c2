"""Framing on the real data path (K2, step 3): requests split at every byte
offset, pipelined, with bodies, chunked, HTTP/1.0, Expect, oversized or
truncated are never misrouted: the kernel answers exactly as the test's real
Envoy does (same policy: /deny -> 403, rest -> upstream), or hands the request
to that Envoy."""

from __future__ import annotations

import json

import pytest
from test_plumbing import DENY, get, run, setup_plan, stats

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]


def served(resp: dict) -> str:  # type: ignore[type-arg]
    """Who answered: 'kernel' (reply), 'fast' (upstream, no Envoy), 'envoy'."""
    if resp["headers"].get("server") == "envoy" or resp["headers"].get("x-via") == "envoy":
        return "envoy"
    return "fast" if resp["headers"].get("x-served-by") == "upstream" else "kernel"


def test_split_at_every_offset(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A head split at any byte is corked and decided whole: served by the
    kernel as the same request in one write would be, the next one too."""
    ups = setup_plan(datapath, envoy.port, upstream, n_up=40)  # one per /fast connection
    datapath.attach_cgroup(cgroup.path)
    conns = []
    for path in ("/fast/abc", "/deny/x"):
        req = get(path)
        for cut in range(1, len(req)):
            conns.append([{"send": [req[:cut], req[cut:]], "pause": 0.005},
                          {"send": [get("/" + path.split("/")[1] + "/after")]}])
    out = run(cgroup, envoy.port, conns)
    for conn, res in zip(conns, out, strict=True):
        first = conn[0]["send"][0] + conn[0]["send"][1]
        if "/deny" in first:
            assert res[0]["status"] == 403 and res[0]["body"] == "RBAC: access denied"
            assert served(res[0]) == "kernel", (first, res[0])
        else:
            assert res[0]["status"] == 200
            assert json.loads(res[0]["body"])["line"] == "GET /fast/abc HTTP/1.1"
            assert served(res[0]) == "fast", (first, res[0])
        if "/deny" in first:
            assert res[1]["status"] == 403 and served(res[1]) == "kernel"
        else:
            assert served(res[1]) == "fast"
            assert json.loads(res[1]["body"])["line"] == "GET /fast/after HTTP/1.1"
    assert not any("/deny" in line for line in upstream.seen)
    st = stats(datapath)
    assert st[(0, 3, 0)] >= len(conns)  # corked at least once per connection
    assert not any(o == 2 for (_, o, _) in st)  # nothing went to Envoy
    for s in ups:
        s.close()


def test_split_head_then_envoy_route(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A corked head whose request goes to Envoy reaches it whole and in order."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    req = get("/punt/x")
    out = run(cgroup, envoy.port, [[{"send": [req[:9], req[9:20], req[20:]], "pause": 0.01},
                                    {"send": [get("/fast/after")]}]])[0]
    assert [json.loads(r["body"])["line"] for r in out] == [
        "GET /punt/x HTTP/1.1", "GET /fast/after HTTP/1.1"]
    assert served(out[0]) == "envoy"  # the next one may be the kernel's again (dp_return.h)
    for s in ups:
        s.close()


CASES = {
    # name: (request bytes, expected status)
    "http10": ("GET /fast/a HTTP/1.0\r\nHost: svc\r\n\r\n", 200),
    "chunked": ("POST /fast/a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                "3\r\nabc\r\n0\r\n\r\n", 200),
    "content_length": ("POST /fast/a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
                       200),
    "expect": ("POST /fast/a HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nExpect: 100-continue"
               "\r\n\r\nhi", 200),
    "oversized_head": ("GET /fast/a HTTP/1.1\r\nHost: svc\r\nX-Big: " + "b" * 3000 + "\r\n\r\n",
                       200),
    "deny_with_body": ("POST /deny HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc", 403),
    "lower_method": ("get /fast/a HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    # short writes that cannot become a request: to Envoy at once, not corked
    "short_garbage": ("PING\r\n", 400),
    "short_bad_line": ("G\r\n", 400),
    "tls_hello": ("\x16\x03\x01\x00\x05hello", 400),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unusual_requests_match_envoy(name, datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    req, status = CASES[name]
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    out = run(cgroup, envoy.port, [[{"send": [req]}]])[0][0]
    assert out["status"] == status, out
    if status == 200:
        assert json.loads(out["body"])["line"].split()[1] == "/fast/a"
    if status == 403:
        assert out["body"] == "RBAC: access denied"
    assert not any("/deny" in line for line in upstream.seen)
    for s in ups:
        s.close()


def test_truncated_request_then_close(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A head that never completes: nothing reaches the upstream, nothing breaks."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    script = [[{"send": ["GET /fast/trunc HTTP/1.1\r\nHo"], "expect": 0}],
              [{"send": [get("/fast/next")]}]]
    out = run(cgroup, envoy.port, script)
    assert out[1][0]["status"] == 200 and served(out[1][0]) == "fast"
    assert not any("/fast/trunc" in line for line in upstream.seen)
    assert DENY  # same reply bytes as the plumbing tests
    for s in ups:
        s.close()
