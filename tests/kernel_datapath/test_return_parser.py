"""The response parser of bpf_src/dp_return.h, table-driven through
BPF_PROG_TEST_RUN (bpf_src/test_return.c, a sched_cls build of the same code).

Owner: envoyreturn. Each case feeds a response stream, cut into segments, into
entry 0 of dp_ret with `pending` requests outstanding (HEAD ones flagged), and
checks what is left pending and whether the connection was given up (lost:
it then stays with Envoy, which is always safe).
"""

from __future__ import annotations

import ctypes as ct
from typing import Any

import pytest

from fastpath import bpfsys
from fastpath.loader import BPF_SRC

pytestmark = [pytest.mark.kernel]

LOST = 9  # DP_RS_LOST
STATUS = 0  # DP_RS_STATUS: between responses


class Opts(ct.Structure):  # libbpf struct bpf_test_run_opts
    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("retval", ct.c_uint32), ("repeat", ct.c_int),
                ("duration", ct.c_uint32), ("flags", ct.c_uint32), ("cpu", ct.c_uint32),
                ("batch_size", ct.c_uint32)]


class Parser:
    """The sched_cls build: feed(segments) into dp_ret[0], read it back."""

    def __init__(self) -> None:
        from bcc import BPF

        text = "\n".join((BPF_SRC / p).read_text()
                         for p in ("datapath.h", "dp_return.h", "test_return.c"))
        self.b = BPF(text=text.encode(), cflags=["-DDP_RSP_BASE=14", f"-I{BPF_SRC}"])
        self.fd = self.b.load_func("tr_scan", BPF.SCHED_CLS).fd
        self.b["dp_rsp_prog"][ct.c_int(0)] = ct.c_int(self.fd)
        self.lib = bpfsys.lib()
        self.lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(Opts)]

    def run(self, pending: int, head_mask: int, segments: list[bytes]) -> Any:
        t = self.b["dp_ret"]
        key = t.Key(0)
        t[key] = t.Leaf(pending=pending, head_mask=head_mask)
        for seg in segments:
            data = b"\0" * 14 + seg
            buf = ct.create_string_buffer(data, len(data))
            o = Opts(sz=ct.sizeof(Opts), data_in=ct.cast(buf, ct.c_void_p), data_size_in=len(data))
            assert self.lib.bpf_prog_test_run_opts(self.fd, ct.byref(o)) == 0, ct.get_errno()
        return t[key]


@pytest.fixture(scope="module")
def parser() -> Parser:
    from support.env import require_kernel

    require_kernel()  # the `kernel` fixture's check, for a module-scoped build
    return Parser()


def resp(status: str = "200 OK", headers: str = "content-length: 5\r\n", body: bytes = b"hello"
         ) -> bytes:
    return f"HTTP/1.1 {status}\r\nserver: envoy\r\n{headers}\r\n".encode() + body


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nx-a: b\r\n\r\n"
           b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n")
HEAD_RESP = resp(headers="content-length: 1234\r\n", body=b"")
CASES = {
    # name: (pending, head_mask, stream, pending left, lost)
    "content-length": (1, 0, resp(), 0, False),
    "two in a row": (2, 0, resp() + resp(), 0, False),
    "one of two": (2, 0, resp(), 1, False),
    "chunked, extension, trailer": (1, 0, CHUNKED, 0, False),
    "HEAD has no body": (2, 1, HEAD_RESP + resp(), 0, False),
    "204": (1, 0, resp("204 No Content", "", b""), 0, False),
    "304 with a length": (1, 0, resp("304 Not Modified", "content-length: 7\r\n", b""), 0, False),
    "zero length": (1, 0, resp(headers="Content-Length: 0\r\n", body=b""), 0, False),
    "100 then 200": (1, 0, resp("100 Continue", "", b"") + resp(), 0, False),
    "100 alone": (1, 0, resp("100 Continue", "", b""), 1, False),
    "body not complete": (1, 0, resp(headers="content-length: 9\r\n"), 1, False),
    "101 switching": (1, 0, resp("101 Switching Protocols", "upgrade: websocket\r\n", b""), 0,
                      True),
    "no length": (1, 0, resp(headers="", body=b"until close"), 1, True),
    "nobody asked": (0, 0, resp(), 0, True),
    "other coding": (1, 0, resp(headers="transfer-encoding: gzip, chunked\r\n", body=b""), 1,
                     True),
    "two lengths": (1, 0, resp(headers="content-length: 5\r\ncontent-length: 5\r\n"), 1, True),
    "not HTTP": (1, 0, b"SSH-2.0-x\r\n\r\n", 1, True),
    "bad length": (1, 0, resp(headers="content-length: 5x\r\n"), 1, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_framing(parser: Parser, name: str) -> None:
    pending, head, stream, left, lost = CASES[name]
    r = parser.run(pending, head, [stream])
    assert (r.state == LOST) == lost, (name, r.state)
    if not lost:
        assert r.pending == left, name


def test_every_split_is_the_same(parser: Parser) -> None:
    """Three responses (chunked, HEAD, Content-Length) cut into two segments at
    every offset, and into single bytes: always all three complete."""
    stream = CHUNKED + HEAD_RESP + resp()
    for cut in range(1, len(stream)):
        r = parser.run(3, 0b010, [stream[:cut], stream[cut:]])
        assert (r.state, r.pending, r.done) == (STATUS, 0, 3), cut
    r = parser.run(3, 0b010, [stream[i:i + 1] for i in range(len(stream))])
    assert (r.state, r.pending) == (STATUS, 0)


def test_large_body_over_many_segments(parser: Parser) -> None:
    body = b"x" * 300_000
    stream = resp(headers=f"content-length: {len(body)}\r\n", body=body) + resp()
    segs = [stream[i:i + 3000] for i in range(0, len(stream), 3000)]
    r = parser.run(2, 0, segs)
    assert (r.state, r.pending) == (STATUS, 0)


def test_head_limit_per_segment(parser: Parser) -> None:
    """A head of more lines than one segment's budget (2 pieces x 33 tail
    calls) is given up in one segment, followed when it comes in two."""
    many = "".join(f"x-h{i}: v\r\n" for i in range(80))
    stream = resp(headers="content-length: 5\r\n" + many)
    assert parser.run(1, 0, [stream]).state == LOST
    half = len(stream) // 2
    r = parser.run(1, 0, [stream[:half], stream[half:]])
    assert (r.state, r.pending) == (STATUS, 0)
