"""Adversarial heads: valid requests with bytes inserted, deleted or replaced,
and cut anywhere. Whenever the kernel decides (FORWARD / REPLY), the strict
sans-I/O parser h11 must accept the same bytes as a request with the same
method, target, Host and head length, and the kernel's consumed length must be
that head plus h11's Content-Length. Anything else must be NEED_MORE or PASS."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import bpf_structs as bs
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import parser_plan

h11 = pytest.importorskip("h11")
pytestmark = [pytest.mark.kernel]

SP = synthesize(parser_plan())
TEMPLATES = [
    b"GET /api/x?y=1 HTTP/1.1\r\nHost: web\r\nAccept: */*\r\n\r\n",
    b"POST /api HTTP/1.1\r\nHost: web:80\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc",
    b"PUT /deny HTTP/1.1\r\ncontent-length: 0\r\nHOST: a.web.example\r\n\r\n",
    b"DELETE /rest HTTP/1.1\r\nHost: web\r\nContent-Length: 12\r\nConnection: close\r\n\r\n",
]
ALPHABET = [b" ", b":", b"\r", b"\n", b"\t", b"\0", b"a", b"A", b"/", b"0", b"9", b"-", b",",
            b"%", b"\x7f", b"\x80", b"?", b"#", b".", b"\r\n", b"\r\n\r\n", b"Host: web\r\n",
            b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(TEMPLATES))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        ins = draw(st.sampled_from(ALPHABET))
        if op == "insert":
            data = data[:pos] + ins + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 4)):]
        else:
            data = data[:pos] + ins + data[pos + len(ins):]
    return data[:draw(st.integers(1, len(data) + 1))] if draw(st.booleans()) else data


def strict_parse(data: bytes) -> tuple[h11.Request, int, int] | None:
    """(request, head length, Content-Length) as h11 reads it, or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data[:end + 4])
    try:
        ev = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(ev, h11.Request):
        return None
    cl = [int(v) for k, v in ev.headers if k == b"content-length"]
    return ev, end + 4, cl[0] if cl else 0


@pytest.fixture(scope="module")
def prog() -> DecideProgram:
    from support.env import require_kernel

    require_kernel()
    p = DecideProgram.get(SP.cflags)
    p.load(SP)
    return p


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_kernel_decides_only_what_a_strict_parser_accepts(prog: DecideProgram, data: bytes) -> None:
    check(prog, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=mutated(), second=mutated())
def test_pipelined_heads(prog: DecideProgram, first: bytes, second: bytes) -> None:
    """Two heads in one write: the second is decided from where the first's
    consumed length ends, and is held to the same rule."""
    data = first + second
    d = check(prog, data)
    if d.verdict in (bs.FORWARD, bs.REPLY) and d.consumed < len(data):
        check(prog, data[d.consumed:])


def check(prog: DecideProgram, data: bytes) -> bs.Decision:
    d = prog.run(data)
    assert d.verdict in (bs.FORWARD, bs.REPLY, bs.NEED_MORE, bs.PASS)
    if d.verdict not in (bs.FORWARD, bs.REPLY):
        return d
    got = strict_parse(data)
    assert got is not None, (data, bs.VERDICT_NAMES[d.verdict])
    req, head_len, cl = got
    assert req.http_version == b"1.1"
    assert d.hdr_len == head_len and d.consumed == head_len + cl, data
    first = data.split(b"\r\n", 1)[0].split(b" ")
    assert (req.method, req.target) == (first[0], first[1])
    hosts = [v for k, v in req.headers if k == b"host"]
    assert len(hosts) == 1
    if d.verdict == bs.FORWARD:
        path = req.target.split(b"?")[0]
        want = "c1" if path.startswith(b"/api") else "c2"
        assert d.cluster == SP.cluster_ids[want], data
    return d
