"""The sk_skb behaviour an ingress gateway's kernel path would rely on, on this
kernel (programs: skskb_gateway_repro.c, sockets: gk_net.py). What works is
asserted as such; what does not work is asserted as the behaviour observed (the
test names say "observed"), so a kernel that fixes or changes it fails here first.
docs/fastpath.md "Gateway kernel path: mechanisms verified" explains each."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kernel]


@pytest.fixture(scope="module")
def repro() -> Iterator[Any]:
    from support.env import require_kernel

    require_kernel()
    from skskb_gateway_repro import Repro

    r = Repro()
    yield r
    r.close()


def run(repro: Any, name: str) -> dict[str, Any]:
    from skskb_gateway_repro import SCENARIOS

    out: dict[str, Any] = repro.run(next(s for s in SCENARIOS if s.name == name))
    return out


def records(out: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in out["log"] if r["kind"] == kind]


def responses(out: dict[str, Any]) -> list[bytes]:
    from gk_net import split_messages

    got, rest = split_messages(out["client"].encode("latin-1"))
    assert rest == b"", out
    return got


GET_A = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
POST_B = "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
FROM_SERVER = b"from-server"
FROM_GATEWAY = b"from-gateway"


def test_sock_ops_puts_only_the_gateway_ports_accepted_socket_in_the_map(repro):  # type: ignore[no-untyped-def]
    out = repro.catch()
    ports = out["client_ports"]
    assert out["in_map"] == [ports["gw"]], out
    ops = records(out, "sockops")
    # PASSIVE_ESTABLISHED (5) for both listeners of the cgroup; the client, and
    # this process's connection to the server, are outside it: not seen at all
    assert [(r["len"], r["lport"], r["rport"], r["ret"]) for r in ops] == [
        (5, 8080, ports["gw"], 0), (5, 8081, ports["other"], -1)], out


def test_verdict_alone_runs_once_per_write(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "split-raw-pass")
    assert [r["snap"] for r in records(out, "verdict") if r["len"]] == [
        "GET", " /a HT", "TP/1.1\r\nHost: x\r\n\r\n"], out
    assert out["gateway"] == GET_A and out["server"] == "", out
    assert [r.endswith(FROM_GATEWAY) for r in responses(out)] == [True]


def test_stream_parser_hands_a_split_head_to_the_verdict_once(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "split-strp-fwd")
    parser = records(out, "parser")
    # the parser sees the bytes so far from the message's start, 0 = wait for more
    assert [(r["len"], r["ret"]) for r in parser] == [(3, 0), (9, 0), (28, 28)], out
    assert parser[1]["snap"] == "GET /a HT"
    assert [r["len"] for r in records(out, "verdict")] == [28], out
    # forwarded out of U: the server has exactly the request, the gateway nothing,
    # and U's response (sk_skb on U) went out of the accepted socket to the client
    assert out["server"] == GET_A and out["gateway"] == "", out
    assert [r.endswith(FROM_SERVER) for r in responses(out)] == [True]


def test_observed_strparser_programs_read_from_the_skbs_start_not_the_messages(repro):  # type: ignore[no-untyped-def]
    """Two requests in one segment: the second parser run (and the verdicts) read
    the segment from byte 0 (skb->len 81: the first request again), so the parser
    returns 28 for a 53-byte request; the kernel sends bytes 28..56."""
    out = run(repro, "pipelined-strp-fwd")
    parser = records(out, "parser")
    assert [(r["len"], r["ret"]) for r in parser][:2] == [(81, 28), (81, 28)], out
    assert all(r["snap"].startswith("GET /a") for r in parser + records(out, "verdict"))
    assert out["server"] == GET_A + POST_B[:28], out
    assert [r.endswith(FROM_SERVER) for r in responses(out)] == [True]


def test_verdict_alone_forwards_a_pipelined_segment_whole(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "pipelined-raw-fwd")
    assert [r["len"] for r in records(out, "verdict") if r["len"]] == [81], out
    assert out["server"] == GET_A + POST_B and out["gateway"] == "", out
    assert [r.endswith(FROM_SERVER) for r in responses(out)] == [True, True]


def test_forward_into_the_servers_receive_queue(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "fwd-ingress")
    assert out["server"] == GET_A and out["gateway"] == "", out
    assert [r.endswith(FROM_SERVER) for r in responses(out)] == [True]


def test_xff_insert_with_verdict_alone(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "xff-raw")
    xff = "x-forwarded-for: 198.18.77.2\r\n"
    assert out["server"] == POST_B.replace("\r\n\r\n", "\r\n" + xff + "\r\n"), out
    assert [r.endswith(FROM_SERVER) for r in responses(out)] == [True]


def test_observed_strparser_cuts_a_grown_message_to_the_parsers_length(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "xff-strp")
    grown = POST_B.replace("\r\n\r\n", "\r\nx-forwarded-for: 198.18.77.2\r\n\r\n")
    assert records(out, "verdict")[0]["r1"] == 0  # bpf_skb_change_tail succeeded
    assert out["server"] == grown[:len(POST_B)], out  # the rest is lost
    assert out["client"] == "" and out["gateway"] == ""


def test_reply_to_the_accepted_sockets_own_egress(repro):  # type: ignore[no-untyped-def]
    from skskb_gateway_repro import REPLY

    for name in ("reply-raw", "reply-raw-long"):  # grown (28 -> 61 bytes), shrunk (107 -> 61)
        out = run(repro, name)
        assert out["client"] == REPLY.decode() and out["gateway"] == out["server"] == "", out
        assert out["so_error"]["gateway"] == 0 and out["read_ended"]["gateway"] == "", out


def test_observed_strparser_reply_longer_than_the_request_is_cut(repro):  # type: ignore[no-untyped-def]
    from skskb_gateway_repro import REPLY

    out = run(repro, "reply-strp")
    assert out["client"] == REPLY.decode()[:len(GET_A)], out
    # shorter than the request: the reply arrives whole, then the psock fails
    # the accepted socket with EPIPE (its reader's recv raises it)
    long = run(repro, "reply-strp-long")
    assert long["client"] == REPLY.decode(), long
    assert long["read_ended"]["gateway"] == "EPIPE", long


def test_pass_then_kernel_on_one_connection(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "pass-then-kernel")
    assert out["gateway"] == GET_A and out["server"] == POST_B, out
    assert [r.endswith(b) for r, b in zip(responses(out), (FROM_GATEWAY, FROM_SERVER),
                                          strict=True)] == [True, True]


def test_observed_kernel_answer_overtakes_the_gateways_earlier_one(repro):  # type: ignore[no-untyped-def]
    """Request 1 PASSed, request 2 sent behind it takes the kernel path, and the
    gateway answers request 1 only once the client holds a response (5 s at
    most): nothing holds the kernel's response to 2 behind the one owed for 1."""
    out = run(repro, "overtake")
    assert out["gateway"] == GET_A and out["server"] == POST_B, out
    assert [r.endswith(b) for r, b in zip(responses(out), (FROM_SERVER, FROM_GATEWAY),
                                          strict=True)] == [True, True]


def test_observed_message_over_rcvbuf_fails_the_socket(repro):  # type: ignore[no-untyped-def]
    out = run(repro, "body-over-rcvbuf")
    assert records(out, "parser")[0]["ret"] == 5000056, out
    assert not records(out, "verdict")
    assert out["so_error"]["gateway"] == 90  # EMSGSIZE (strparser's abort)
    assert out["gateway"] == out["server"] == out["client"] == ""
    assert out["eagain"]["gateway"] > 0  # its blocking reader gets EAGAIN, not the error


@pytest.mark.envoy
@pytest.mark.alone  # round-trip times (reported, not asserted) move with the machine's load
def test_gateway_envoy_edge_headers_and_latency_side_by_side(repro, envoy_bin):  # type: ignore[no-untyped-def]
    from gk_net import NetnsEnvoy
    from skskb_gateway_repro import envoy_edge, latency

    with tempfile.TemporaryDirectory(prefix="gk-envoy-") as wd:
        envoy = NetnsEnvoy(envoy_bin, repro.netns, Path(wd))
        try:
            edge = envoy_edge(repro)
            lat = latency(repro, envoy, rounds=2, per_round=150)
        finally:
            envoy.close()
    got = edge["server_got"].lower()
    assert "x-forwarded-for: 203.0.113.9,198.18.77.2\r\n" in got, edge
    assert "x-envoy-external-address: 198.18.77.2\r\n" in got
    assert "x-forwarded-proto: http\r\n" in got
    assert "x-request-id: client-chosen" not in got and "x-request-id: " in got
    assert [h for h in got.split("\r\n") if h.startswith("x-envoy-")] == [
        "x-envoy-external-address: 198.18.77.2", "x-envoy-expected-rq-timeout-ms: 15000"]
    head = edge["client_got"].lower()
    assert "server: envoy" in head and "x-envoy-upstream-service-time: " in head
    assert lat["bad_responses"] == {"envoy": 0, "kernel": 0, "direct": 0}, lat
    assert lat["gateway_saw"] == 0 and lat["envoy_alive"], lat
    print(lat)
