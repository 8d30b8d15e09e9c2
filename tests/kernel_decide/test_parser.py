"""Table-driven tests of the HTTP/1.1 head parser inside l7fp_decide, run in the
kernel through BPF_PROG_TEST_RUN (sched_cls harness bpf_src/test_decide.c)."""

from __future__ import annotations

import pytest

from fastpath import bpf_structs as bs
from fastpath.reference import KERNEL_METHODS
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.plans import parser_plan

pytestmark = [pytest.mark.kernel]

FWD, REP, MORE, PASS = bs.FORWARD, bs.REPLY, bs.NEED_MORE, bs.PASS
R = bs.REASON
SP = synthesize(parser_plan())
MAX_HDR = SP.knobs["L7FP_MAX_HDR"]


@pytest.fixture(scope="module")
def prog() -> DecideProgram:
    from support.env import require_kernel

    require_kernel()
    p = DecideProgram.get(SP.cflags)
    p.load(SP)
    return p


def req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + body


GET = req("GET /api/x HTTP/1.1\nHost: web\n\n")
POST = req("POST /api/items?q=1 HTTP/1.1\nHost: web\nContent-Length: 5\nX-A: b\n\n", b"hello")

CASES = [
    # (id, bytes, verdict, PASS reason / FORWARD+REPLY: body bytes not in the data yet)
    ("get", GET, FWD, 0),
    ("post-body", POST, FWD, 0),
    ("deny-reply", req("GET /deny HTTP/1.1\nHost: web\n\n"), REP, 0),
    ("punt-route", req("GET /slow/x HTTP/1.1\nHost: web\n\n"), PASS, R["punt_route"]),
    ("no-endpoint", req("GET /empty HTTP/1.1\nHost: web\n\n"), PASS, R["no_endpoint"]),
    ("host-upper-case", req("GET /api HTTP/1.1\nHOST: WEB\n\n"), FWD, 0),
    ("host-with-port", req("GET /api HTTP/1.1\nHost: web:80\n\n"), FWD, 0),
    ("host-other-port-404", req("GET /api HTTP/1.1\nhost: web:81\n\n"), REP, 0),
    ("host-suffix-wildcard", req("GET /api HTTP/1.1\nHost: a.web.example\n\n"), FWD, 0),
    ("host-wildcard-needs-a-label", req("GET /api HTTP/1.1\nHost: .web.example\n\n"), REP, 0),
    ("cl-upper-case", req("POST /api HTTP/1.1\nHost: web\nCONTENT-LENGTH: 3\n\n", b"abc"), FWD, 0),
    ("cl-lower-case", req("POST /api HTTP/1.1\nHost: web\ncontent-length: 3\n\n", b"abc"), FWD, 0),
    ("cl-zero", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 0\n\n"), FWD, 0),
    ("cl-8-digits", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 12345678\n\n"), FWD,
     12345678),
    ("cl-ows", req("POST /api HTTP/1.1\nHost: web\nContent-Length:  7 \t\n\n"), FWD, 7),
    # more padding than the kernel trims: Envoy decides
    ("ows-3", req("POST /api HTTP/1.1\nHost: web\nContent-Length:   7\n\n"), PASS, R["unparsed"]),
    ("cl-negative", req("POST /api HTTP/1.1\nHost: web\nContent-Length: -1\n\n"), PASS, R["bad_cl"]),
    ("cl-letters", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 1a\n\n"), PASS, R["bad_cl"]),
    ("cl-list", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 1,1\n\n"), PASS, R["bad_cl"]),
    ("cl-empty", req("POST /api HTTP/1.1\nHost: web\nContent-Length:\n\n"), PASS, R["bad_cl"]),
    ("cl-huge", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 123456789012\n\n"), PASS,
     R["bad_cl"]),
    ("cl-duplicate", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 1\nContent-Length: 1\n\n"),
     PASS, R["bad_cl"]),
    ("cl-space-inside", req("POST /api HTTP/1.1\nHost: web\nContent-Length: 1 2\n\n"), PASS,
     R["bad_cl"]),
    ("chunked", req("POST /api HTTP/1.1\nHost: web\nTransfer-Encoding: chunked\n\n"), PASS,
     R["chunked"]),
    ("chunked-lower", req("POST /api HTTP/1.1\nHost: web\ntransfer-encoding: chunked\n\n"), PASS,
     R["chunked"]),
    ("expect", req("POST /api HTTP/1.1\nHost: web\nExpect: 100-continue\n\n"), PASS, R["expect"]),
    ("upgrade", req("GET /api HTTP/1.1\nHost: web\nConnection: Upgrade\nUpgrade: websocket\n\n"),
     PASS, R["upgrade"]),
    ("connect", req("CONNECT web:443 HTTP/1.1\nHost: web\n\n"), PASS, R["upgrade"]),
    ("http10", req("GET /api HTTP/1.0\nHost: web\n\n"), PASS, R["http10"]),
    ("http2-version", req("GET /api HTTP/2.0\nHost: web\n\n"), PASS, R["http10"]),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", PASS, R["h2"]),
    ("absolute-form", req("GET http://web/api HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("asterisk-form", req("OPTIONS * HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("no-host", req("GET /api HTTP/1.1\nX-A: b\n\n"), PASS, R["no_host"]),
    ("two-hosts", req("GET /api HTTP/1.1\nHost: web\nHost: web\n\n"), PASS, R["no_host"]),
    ("host-with-space", req("GET /api HTTP/1.1\nHost: web x\n\n"), PASS, R["no_host"]),
    ("host-with-slash", req("GET /api HTTP/1.1\nHost: web/x\n\n"), PASS, R["no_host"]),
    ("host-too-long", req("GET /api HTTP/1.1\nHost: " + "a" * 129 + "\n\n"), PASS, R["no_host"]),
    ("host-ipv4-port", req("GET /api HTTP/1.1\nHost: 198.18.0.2:8080\n\n"), REP, 0),
    ("empty-host", req("GET /api HTTP/1.1\nHost: \n\n"), PASS, R["no_host"]),
    ("bare-lf", b"GET /api HTTP/1.1\nHost: web\n\n", PASS, R["unparsed"]),
    ("bare-cr", b"GET /api HTTP/1.1\rHost: web\r\n\r\n", PASS, R["unparsed"]),
    ("obs-fold", req("GET /api HTTP/1.1\nHost: web\nX-A: b\n c\n\n"), PASS, R["unparsed"]),
    ("space-before-colon", req("GET /api HTTP/1.1\nHost : web\n\n"), PASS, R["unparsed"]),
    ("no-colon", req("GET /api HTTP/1.1\nHost web\n\n"), PASS, R["unparsed"]),
    ("empty-name", req("GET /api HTTP/1.1\nHost: web\n: x\n\n"), PASS, R["unparsed"]),
    ("nul-in-value", req("GET /api HTTP/1.1\nHost: web\nX-A: a\0b\n\n"), PASS, R["unparsed"]),
    ("leading-crlf", req("\nGET /api HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("lower-case-method", req("get /api HTTP/1.1\nHost: web\n\n"), PASS, R["method"]),
    ("long-method", req("PROPPATCHX /api HTTP/1.1\nHost: web\n\n"), PASS, R["method"]),
    # an upper-case word Envoy's codec does not know: Envoy answers 400 itself
    ("unknown-method", req("FOO /api HTTP/1.1\nHost: web\n\n"), PASS, R["method"]),
    ("query-method", req("QUERY /api HTTP/1.1\nHost: web\n\n"), PASS, R["method"]),
    ("webdav-method", req("PROPFIND /api HTTP/1.1\nHost: web\n\n"), FWD, 0),
    ("leading-space", req(" GET /api HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("three-spaces", req("GET /api x HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("pct-escape", req("GET /api/%2e HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("fragment", req("GET /api#x HTTP/1.1\nHost: web\n\n"), PASS, R["unparsed"]),
    ("double-slash", req("GET /api//x HTTP/1.1\nHost: web\n\n"), PASS, R["path_norm"]),
    ("dot-dot", req("GET /api/../x HTTP/1.1\nHost: web\n\n"), PASS, R["path_norm"]),
    ("dot", req("GET /api/./x HTTP/1.1\nHost: web\n\n"), PASS, R["path_norm"]),
    ("final-dot-dot", req("GET /api/.. HTTP/1.1\nHost: web\n\n"), PASS, R["path_norm"]),
    ("final-dot-before-query", req("GET /api/.?a HTTP/1.1\nHost: web\n\n"), PASS, R["path_norm"]),
    ("dot-file-is-fine", req("GET /.well-known HTTP/1.1\nHost: web\n\n"), FWD, 0),
    ("dots-in-query-are-fine", req("GET /api?a=/../ HTTP/1.1\nHost: web\n\n"), FWD, 0),
    ("grpc-timeout", req("GET /api HTTP/1.1\nHost: web\ngrpc-timeout: 1S\n\n"), PASS, R["unparsed"]),
    # Envoy strips, overwrites or acts on these (tests/split/test_stripped_headers_envoy.py)
    ("x-envoy-header", req("GET /api HTTP/1.1\nHost: web\nX-Envoy-Internal: true\n\n"), PASS,
     R["hdr_conflict"]),
    ("x-envoy-timeout", req("GET /api HTTP/1.1\nHost: web\nx-envoy-upstream-rq-timeout-ms: 9\n\n"), PASS,
     R["hdr_conflict"]),
    ("x-envoy-short", req("GET /api HTTP/1.1\nHost: web\nx-envoy-a: 1\n\n"), PASS, R["hdr_conflict"]),
    ("x-envoy-bare-prefix", req("GET /api HTTP/1.1\nHost: web\nx-envoy-: 1\n\n"), FWD, 0),
    ("xfcc", req("GET /api HTTP/1.1\nHost: web\nX-Forwarded-Client-Cert: By=spiffe://x\n\n"), PASS,
     R["hdr_conflict"]),
    ("x-forwarded-for-is-fine", req("GET /api HTTP/1.1\nHost: web\nX-Forwarded-For: 198.18.0.1\n\n"), FWD, 0),
    ("x-envoyish-is-fine", req("GET /api HTTP/1.1\nHost: web\nx-envoyz: 1\n\n"), FWD, 0),
    ("head-reply", req("HEAD /deny HTTP/1.1\nHost: web\n\n"), REP, 0),
    ("head-forward", req("HEAD /api HTTP/1.1\nHost: web\n\n"), FWD, 0),
]


@pytest.mark.parametrize("data,verdict,extra", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table(prog: DecideProgram, data: bytes, verdict: int, extra: int) -> None:
    d = prog.run(data)
    got = (bs.VERDICT_NAMES.get(d.verdict), bs.REASONS[d.reason] if d.reason < len(bs.REASONS) else d.reason)
    assert d.verdict == verdict, got
    if verdict == PASS:
        assert bs.REASONS[d.reason] == bs.REASONS[extra]
    else:
        assert d.consumed == len(data) + extra
        assert d.hdr_len == data.index(b"\r\n\r\n") + 4


def test_routes_and_clusters(prog: DecideProgram) -> None:
    d = prog.run(GET)
    assert (d.cluster, d.route) == (SP.cluster_ids["c1"], SP.route_names.index("out/web/api"))
    d = prog.run(req("GET /other HTTP/1.1\nHost: web\n\n"))
    assert d.cluster == SP.cluster_ids["c2"]
    d = prog.run(req("GET /deny HTTP/1.1\nHost: web\n\n"))
    assert d.status == 403
    assert SP.rows["l7fp_replies"][d.reply][bs.structs(SP.knobs).Blob.b.offset:].startswith(
        b"HTTP/1.1 403 Forbidden\r\n")


def test_head_reply_has_no_body(prog: DecideProgram) -> None:
    blob = bs.structs(SP.knobs).Blob
    d = prog.run(req("HEAD /deny HTTP/1.1\nHost: web\n\n"))
    b = blob.from_buffer_copy(SP.rows["l7fp_replies"][d.reply])
    assert bytes(b.b[:b.len]) == b"HTTP/1.1 403 Forbidden\r\ncontent-length: 7\r\n" \
        b"content-type: text/plain\r\n\r\n"
    d = prog.run(req("GET /deny HTTP/1.1\nHost: web\n\n"))
    b = blob.from_buffer_copy(SP.rows["l7fp_replies"][d.reply])
    assert bytes(b.b[:b.len]).endswith(b"\r\n\r\ndenied\n")


@pytest.mark.parametrize("full", [GET, POST], ids=["get", "post"])
def test_truncated_at_every_offset(prog: DecideProgram, full: bytes) -> None:
    """Every prefix: NEED_MORE until the head is complete, then FORWARD of the
    whole request (head + body) -- never a shorter or longer consumed length."""
    head_len = full.index(b"\r\n\r\n") + 4
    for n in range(1, len(full) + 1):
        d = prog.run(full[:n])
        if n < head_len:
            assert d.verdict == MORE, (n, d.verdict, d.reason)
        else:
            assert (d.verdict, d.consumed, d.hdr_len) == (FWD, len(full), head_len), n


def test_truncated_h2_preface_never_forwards(prog: DecideProgram) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for n in range(1, len(preface) + 1):
        assert prog.run(preface[:n]).verdict in (MORE, PASS), n


def test_pipelined_requests(prog: DecideProgram) -> None:
    data = POST + GET + req("GET /deny HTTP/1.1\nHost: web\n\n")
    seen = []
    while data:
        d = prog.run(data)
        assert d.verdict in (FWD, REP)
        seen.append(d.verdict)
        data = data[d.consumed:]
    assert seen == [FWD, FWD, REP]


def test_oversized_head(prog: DecideProgram) -> None:
    big = req("GET /api HTTP/1.1\nHost: web\nX-Pad: " + "a" * MAX_HDR + "\n\n")
    assert (prog.run(big).verdict, prog.run(big).reason) == (PASS, R["too_large"])
    # incomplete but already over the limit: Envoy, not a cork forever
    assert prog.run(big[:MAX_HDR + 10]).verdict == PASS
    many = req("GET /api HTTP/1.1\nHost: web\n" + "X-A: b\n" * 40 + "\n")
    assert len(many) < MAX_HDR
    assert (prog.run(many).verdict, prog.run(many).reason) == (PASS, R["too_large"])


def test_head_exactly_at_limit(prog: DecideProgram) -> None:
    base = req("GET /api HTTP/1.1\nHost: web\nX-Pad: \n\n")
    fit = req("GET /api HTTP/1.1\nHost: web\nX-Pad: " + "a" * (MAX_HDR - len(base)) + "\n\n")
    assert len(fit) == MAX_HDR
    assert (prog.run(fit).verdict, prog.run(fit).consumed) == (FWD, MAX_HDR)


def test_methods_are_envoys(prog: DecideProgram) -> None:
    """The kernel forwards exactly the methods of at most 8 bytes Envoy's codec
    knows (fastpath.reference.KERNEL_METHODS, checked against the binary in
    tests/split/test_methods_envoy.py); any other word goes to Envoy, which
    answers it 400 itself."""
    from tests.split.test_methods_envoy import CANDIDATES

    forwarded = set()
    for m in CANDIDATES:
        d = prog.run(req(f"{m} /api HTTP/1.1\nHost: web\n\n"))
        if d.verdict == FWD:
            forwarded.add(m)
        else:
            assert d.verdict == PASS, (m, bs.VERDICT_NAMES.get(d.verdict))
    assert forwarded == KERNEL_METHODS - {"CONNECT"}
