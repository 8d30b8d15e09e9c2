"""Connections handed to Envoy at a request boundary come back to the kernel
(bpf_src/dp_return.h), with every response in order.

Owner: envoyreturn. A real Envoy is the slow path (conftest.Envoy: /deny ->
403, the rest to the upstream); the upstream (k2_ret_server.RetServer)
answers with chunked bodies, bodies in many pieces, 300 kB bodies, HEAD and
204, all of which Envoy passes on as it gets them, so Envoy's responses reach
the client socket in many segments. Kernel routes: /fast -> the same upstream
over a pooled socket, /deny -> kernel 403; anything else -> Envoy.
"""

from __future__ import annotations

import json

import pytest
from k2_helpers import ScopedCgroup
from k2_ret_server import RetServer
from test_plumbing import setup_plan, stats

from fastpath.loader import Datapath

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = __file__.replace("test_return.py", "k2_ret_client.py")
R_ENVOY_PENDING, R_RSP_LOST = 24, 25  # dp_return.h
OUT_FAST, OUT_REPLY, OUT_ENVOY = 0, 1, 2


@pytest.fixture
def upstream():  # type: ignore[no-untyped-def]
    """Overrides conftest's upstream (so its Envoy sends here too)."""
    s = RetServer()
    yield s
    s.close()


def talk(cg: ScopedCgroup, port: int, script: list[dict[str, list[str]]]) -> list[dict]:  # type: ignore[type-arg]
    import sys

    r = cg.run([sys.executable, CLIENT, "127.0.0.1", str(port), json.dumps(script)])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def line(res: dict) -> str:  # type: ignore[type-arg]
    return json.loads(res["body"])["line"]  # type: ignore[no-any-return]


def by(res: dict) -> str:  # type: ignore[type-arg]
    return "envoy" if res["headers"].get("x-via") == "envoy" else "kernel"


def reasons(dp: Datapath) -> dict[int, int]:
    out: dict[int, int] = {}
    for (_, outcome, reason), n in stats(dp).items():
        if outcome == OUT_ENVOY:
            out[reason] = out.get(reason, 0) + n
    return out


def test_alternating_routes_in_order(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """Keep-alive: Envoy and kernel routes alternate; every Envoy framing is
    followed, so every kernel route after it is served by the kernel."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    envoy_paths = ["GET /e/plain", "GET /e/chunked", "GET /e/pieces", "HEAD /e/plain",
                   "GET /e/nobody", "GET /e/big", "GET /deny/x"]
    script = []
    for i, e in enumerate(envoy_paths * 2):
        script += [{"send": [e]}, {"send": [f"GET /fast/{i}"]}]
    script += [{"send": ["GET /deny"]}, {"send": ["GET /fast/last"]}]
    out = talk(cgroup, envoy.port, script)
    assert len(out) == len(script)
    for step, res in zip(script, out, strict=True):
        method, path = step["send"][0].split(" ")
        if path.startswith("/fast/"):
            assert by(res) == "kernel", (path, res["headers"])
            assert line(res) == f"GET {path} HTTP/1.1"
        elif path == "/deny":
            assert res["status"] == 403 and res["headers"].get("server") != "envoy"
        elif path == "/deny/x":  # not a kernel route ("/deny" prefix is, in Envoy too)
            assert res["status"] == 403
        else:
            assert by(res) == "envoy", (path, res["headers"])
            if method == "HEAD":
                assert res["status"] == 200 and res["body"] == ""
            elif path.endswith("nobody"):
                assert res["status"] == 204
            else:
                assert line(res) == f"GET {path} HTTP/1.1", path
    st = stats(datapath)
    fast = sum(n for (_, o, _), n in st.items() if o == OUT_FAST)
    assert fast == len(envoy_paths) * 2 + 1
    assert R_RSP_LOST not in reasons(datapath) and 1 not in reasons(datapath)  # never sticky
    for s in ups:
        s.close()


def test_pipelined_across_the_boundary(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """The client writes kernel requests before Envoy's (slow, streamed)
    response arrived: they go to Envoy too, so nothing overtakes; once all is
    answered the next request is the kernel's again."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    # At most three in flight: Envoy closes a connection on which more than two
    # responses wait to be flushed ("Too many responses queued", its HTTP/1
    # flood protection), with or without the fast path.
    script = [
        {"send": ["GET /e/pieces", "GET /fast/1", "GET /deny"]},
        {"send": ["GET /fast/2"]},
        {"send": ["GET /e/chunked", "HEAD /fast/3", "GET /fast/4"]},
        {"send": ["GET /fast/5"]},
    ]
    out = talk(cgroup, envoy.port, script)
    assert [r["status"] for r in out] == [200, 200, 403, 200, 200, 200, 200, 200]
    assert line(out[0]) == "GET /e/pieces HTTP/1.1"
    assert line(out[1]) == "GET /fast/1 HTTP/1.1"
    assert [by(out[i]) for i in (1, 2)] == ["envoy"] * 2  # behind Envoy's response
    assert out[2]["headers"].get("server") == "envoy"  # Envoy's 403, not the kernel's
    assert line(out[3]) == "GET /fast/2 HTTP/1.1" and by(out[3]) == "kernel"
    assert line(out[4]) == "GET /e/chunked HTTP/1.1"
    assert out[5]["body"] == "" and by(out[5]) == "envoy"  # HEAD behind it
    assert line(out[6]) == "GET /fast/4 HTTP/1.1" and by(out[6]) == "envoy"
    assert line(out[7]) == "GET /fast/5 HTTP/1.1" and by(out[7]) == "kernel"
    assert R_ENVOY_PENDING in reasons(datapath)
    assert R_RSP_LOST not in reasons(datapath) and 1 not in reasons(datapath)
    for s in ups:
        s.close()


def test_mid_stream_handover_stays_with_envoy(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A request the kernel cannot frame (its head longer than the built-in
    decision parses) is not one it can count: the connection stays with Envoy
    for good, as before. A split head is no such case any more: the kernel
    corks it and hands it over whole, and the connection comes back."""
    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    from test_plumbing import get, run

    big = get("/e/plain", "x-big: " + "b" * 600 + "\r\n")
    head = get("/e/plain")
    out = run(cgroup, envoy.port, [
        [{"send": [big]}, {"send": [get("/fast/after")]}],
        [{"send": [head[:10], head[10:]], "pause": 0.02}, {"send": [get("/fast/after")]}]])
    assert [r["headers"].get("x-via") for r in out[0]] == ["envoy", "envoy"]
    assert reasons(datapath).get(1, 0) >= 1  # sticky
    assert [r["headers"].get("x-via") for r in out[1]] == ["envoy", None]  # back
    for s in ups:
        s.close()
