"""sk_skb reproducer for an ingress gateway's receive-side kernel path (NAME=gwkernel).

Owner: gwkernel. Run as root from the repository:
`PYTHONPATH=. .venv/bin/python tests/kernel_datapath/skskb_gateway_repro.py [latency]`
prints one JSON line per scenario: the programs' log (sock_ops, stream parser,
verdicts with skb->len, returns and the first bytes bpf_skb_load_bytes reads),
the bytes the client, the gateway (the accepted socket's owner) and the server
saw. `latency` adds what a gateway-like Envoy does to an external client's
headers and the Envoy / kernel / direct round-trip medians.
test_skskb_gateway_semantics.py asserts the behaviour printed here.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gk_net import (
    CLIENT_IP,
    ENVOY_PORT,
    GW_PORT,
    OTHER_PORT,
    SERVER_PORT,
    AcceptLoop,
    Cgroup,
    Netns,
    NetnsEnvoy,
    Peer,
    exchange,
    remove_stale,
    response,
    split_messages,
)

from fastpath import bpfsys

SRC = Path(__file__).with_name("skskb_gateway_repro.c")
SK_SKB_STREAM_PARSER, SK_SKB_STREAM_VERDICT = 4, 5  # enum bpf_attach_type
MODES = {"pass": 0, "fwd": 1, "fwd_ingress": 2, "xff": 3, "reply": 4}
KINDS = {1: "sockops", 2: "parser", 3: "verdict", 4: "up"}
UP_KEY, SRV_KEY = 1, 2
SERVER_BODY = b"from-server"
REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nserver: gk-kernel\r\n\r\nkernel"  # GK_REPLY_TEXT
QUIET_S = 0.15  # no new byte anywhere for this long: a scenario is over


def server_answer(req: bytes) -> bytes:
    return response(SERVER_BODY, "x-served-by: server\r\n")


def gateway_answer(req: bytes) -> bytes:
    return response(b"from-gateway", "x-served-by: gateway\r\n")


@dataclass
class Scenario:
    name: str
    writes: list[bytes]
    mode: str = "fwd"
    raw: bool = False  # True: SK_SKB_VERDICT alone on the accepted socket
    pass_first: int = 0
    gateway_last: bool = False  # the gateway answers once the client holds a response
    wait_responses: bool = False  # wait for a response before each next write
    expect: int = 0  # wait (3 s at most) for this many whole responses at the client
    # and for these counts: (peer, "got" bytes or "eagain" returns, at least)
    wait_for: tuple[tuple[str, str, int], ...] = ()


class Repro:
    """The loaded programs, the netns, the cgroup, the gateway listeners and the
    server; `run(scenario)` makes a fresh client, accepted and upstream socket."""

    def __init__(self) -> None:
        from bcc import BPF

        self._stack = contextlib.ExitStack()
        try:
            self._setup(BPF)
        except BaseException:
            self.close()
            raise

    def _setup(self, BPF: Any) -> None:  # noqa: N803 (the bcc class)
        st = self._stack
        # compiled first: an LLVM error aborts the process, before anything to remove exists
        self.b: Any = BPF(text=SRC.read_text().encode())
        st.callback(self.b.cleanup)
        remove_stale()
        self.netns = Netns()
        st.callback(self.netns.close)
        self.cg = Cgroup()
        st.callback(self.cg.close)
        fd = {n: bpfsys.table_fd(self.b, n) for n in ("gk_strp", "gk_raw", "gk_up")}
        self.fd = fd
        prog = {n: self.b.load_func(n, t).fd for n, t in (
            ("gk_sockops", BPF.SOCK_OPS), ("gk_parser", BPF.SK_SKB),
            ("gk_verdict", BPF.SK_SKB), ("gk_up_verdict", BPF.SK_SKB))}
        for p, target, at in ((prog["gk_parser"], fd["gk_strp"], SK_SKB_STREAM_PARSER),
                              (prog["gk_verdict"], fd["gk_strp"], SK_SKB_STREAM_VERDICT),
                              (prog["gk_verdict"], fd["gk_raw"], bpfsys.SK_SKB_VERDICT),
                              (prog["gk_up_verdict"], fd["gk_up"], bpfsys.SK_SKB_VERDICT),
                              (prog["gk_sockops"], self.cg.fd, bpfsys.CGROUP_SOCK_OPS)):
            self._attach(p, target, at)
        self.gw, self.other = self.cg.listeners(self.netns)
        st.callback(self.other.close)
        st.callback(self.gw.close)
        self.server = self.netns.listen(SERVER_PORT)
        st.callback(self.server.close)

    def _attach(self, prog: int, target: int, attach_type: int) -> None:
        link = bpfsys.link_create(prog, target, attach_type)
        if link >= 0:
            self._stack.callback(os.close, link)
        else:  # a kernel without a link for this attach type (6.18 has them all): legacy attach
            bpfsys.prog_attach(prog, target, attach_type)
            self._stack.callback(bpfsys.prog_detach, prog, target, attach_type)

    def close(self) -> None:
        self._stack.close()

    def configure(self, raw: bool, mode: str, pass_first: int = 0, client_key: int = 0) -> None:
        cfg = self.b["gk_cfg_m"]
        v = cfg[0]
        v.gw_port, v.raw, v.mode, v.pass_first, v.client_key = (
            GW_PORT, int(raw), MODES[mode], pass_first, client_key)
        cfg[0] = v

    def log(self) -> list[dict[str, Any]]:
        n = self.b["gk_n"][0].value
        out = []
        for i in range(min(n, 256)):
            r = self.b["gk_log"][i]
            rec = {"kind": KINDS.get(r.kind, r.kind), "len": r.len, "ret": r.ret, "r1": r.r1,
                   "r2": r.r2, "lport": r.lport, "rport": r.rport}
            if r.kind != 1:
                rec["snap"] = bytes(r.snap[:r.snap_len]).decode("latin-1")
            out.append(rec)
        return out

    def keys(self, map_name: str) -> list[int]:
        """The keys of a SOCKHASH (a user-space lookup of a 4-byte-valued one is refused)."""
        lib = bpfsys.lib()
        lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        out: list[int] = []
        cur, nxt = ct.c_uint64(), ct.c_uint64()
        prev = None
        while lib.bpf_map_get_next_key(self.fd[map_name], prev, ct.byref(nxt)) == 0:
            out.append(nxt.value)
            cur.value = nxt.value
            prev = ct.byref(cur)
            if len(out) > 64:
                break
        return sorted(out)

    def _records(self) -> int:
        return int(self.b["gk_n"][0].value)

    def _wait(self, cond: Any, secs: float = 3.0) -> bool:
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.005)
        return False

    def _quiet(self, peers: list[Peer], secs: float = 3.0) -> None:
        """Until no peer got a byte and no program ran for QUIET_S (at most `secs`)."""
        deadline = time.monotonic() + secs
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = (self._records(), *(len(p.got) for p in peers))
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= QUIET_S:
                return
            time.sleep(0.01)

    def run(self, sc: Scenario) -> dict[str, Any]:
        self.configure(sc.raw, sc.mode, sc.pass_first)
        self.b["gk_n"].clear()
        self.b["gk_log"].clear()
        gw_map = "gk_raw" if sc.raw else "gk_strp"
        with contextlib.ExitStack() as st:
            up = self.netns.connect(SERVER_PORT)
            st.callback(up.close)
            srv_sock, _ = self.server.accept()
            bpfsys.map_update(self.fd["gk_up"], ct.c_uint64(UP_KEY), ct.c_uint32(up.fileno()))
            st.callback(bpfsys.map_delete, self.fd["gk_up"], ct.c_uint64(UP_KEY))
            if sc.mode == "fwd_ingress":  # S joins gk_up before its reader starts reading
                bpfsys.map_update(self.fd["gk_up"], ct.c_uint64(SRV_KEY),
                                  ct.c_uint32(srv_sock.fileno()))
                st.callback(bpfsys.map_delete, self.fd["gk_up"], ct.c_uint64(SRV_KEY))
            server = Peer(srv_sock, server_answer)
            st.callback(server.close)
            client = self.netns.connect(GW_PORT)
            st.callback(client.close)
            cport = client.getsockname()[1]
            self.configure(sc.raw, sc.mode, sc.pass_first, client_key=cport)
            cli = Peer(client)
            acc, _ = self.gw.accept()
            in_map = self.keys(gw_map)
            hold = (lambda: not split_messages(cli.got)[0]) if sc.gateway_last else None
            gateway = Peer(acc, gateway_answer, hold)
            st.callback(gateway.close)
            peers = [cli, gateway, server]
            sent = []
            for i, w in enumerate(sc.writes):
                before = self._records()
                client.sendall(w)
                sent.append(len(w))
                # the next piece only once a program ran on this one (a separate skb)
                self._wait(lambda b=before: self._records() > b)  # type: ignore[misc]
                if sc.wait_responses:
                    self._wait(lambda n=i + 1: len(split_messages(cli.got)[0]) >= n)
            by_name = {"client": cli, "gateway": gateway, "server": server}

            def count(name: str, what: str) -> int:
                v = getattr(by_name[name], what)
                return len(v) if isinstance(v, bytes) else int(v)

            self._wait(lambda: len(split_messages(cli.got)[0]) >= sc.expect and all(
                count(name, what) >= n for name, what, n in sc.wait_for))
            self._quiet(peers)
            return {"scenario": sc.name, "mode": sc.mode,
                    "attach": "SK_SKB_VERDICT" if sc.raw else "STREAM_PARSER+STREAM_VERDICT",
                    "client_port": cport, "in_map": in_map, "sent": sent, "log": self.log(),
                    "client": cli.got.decode("latin-1"),
                    "gateway": gateway.got.decode("latin-1"),
                    "server": server.got.decode("latin-1"),
                    "read_ended": {"client": cli.err, "gateway": gateway.err},
                    "so_error": {"client": client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
                                 "gateway": acc.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)},
                    "eagain": {"client": cli.eagain, "gateway": gateway.eagain}}

    def catch(self) -> dict[str, Any]:
        """Which established sockets sock_ops sees and which it puts into gk_strp:
        a connection to the gateway port, one to the other listener of the cgroup,
        and one from this process (outside the cgroup) to the server."""
        self.configure(False, "pass")
        self.b["gk_n"].clear()
        self.b["gk_log"].clear()
        socks = []
        try:
            for port, lsn in ((GW_PORT, self.gw), (OTHER_PORT, self.other),
                              (SERVER_PORT, self.server)):
                socks.append(self.netns.connect(port))
                socks.append(lsn.accept()[0])
            ports = {"gw": socks[0].getsockname()[1], "other": socks[2].getsockname()[1],
                     "server": socks[4].getsockname()[1]}
            return {"scenario": "catch", "client_ports": ports, "in_map": self.keys("gk_strp"),
                    "log": self.log()}
        finally:
            for s in socks:
                s.close()


GET_A = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
POST_B = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
SPLIT = [b"GET", b" /a HT", b"TP/1.1\r\nHost: x\r\n\r\n"]

GET_LONG = b"GET /" + b"l" * 80 + b" HTTP/1.1\r\nHost: x\r\n\r\n"  # longer than the reply
BIG_HEAD = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"

SCENARIOS = [
    Scenario("split-raw-pass", SPLIT, mode="pass", raw=True, expect=1),
    Scenario("split-strp-fwd", SPLIT, expect=1),
    Scenario("pipelined-strp-fwd", [GET_A + POST_B], expect=1, wait_for=(("server", "got", 56),)),
    Scenario("pipelined-raw-pass", [GET_A + POST_B], mode="pass", raw=True, expect=2),
    Scenario("pipelined-raw-fwd", [GET_A + POST_B], raw=True, expect=2),
    Scenario("fwd-ingress", [GET_A], mode="fwd_ingress", expect=1),
    Scenario("xff-strp", [POST_B], mode="xff", wait_for=(("server", "got", len(POST_B)),)),
    Scenario("xff-raw", [POST_B], mode="xff", raw=True, expect=1),
    Scenario("reply-strp", [GET_A], mode="reply", wait_for=(("client", "got", len(GET_A)),)),
    Scenario("reply-strp-long", [GET_LONG], mode="reply", expect=1),
    Scenario("reply-raw", [GET_A], mode="reply", raw=True, expect=1),
    Scenario("reply-raw-long", [GET_LONG], mode="reply", raw=True, expect=1),
    Scenario("pass-then-kernel", [GET_A, POST_B], pass_first=1, wait_responses=True, expect=2),
    Scenario("overtake", [GET_A, POST_B], pass_first=1, gateway_last=True,
             expect=2),
    Scenario("body-over-rcvbuf", [BIG_HEAD], mode="pass", wait_for=(("gateway", "eagain", 1),)),
]


def latency(r: Repro, envoy: NetnsEnvoy, rounds: int = 4, per_round: int = 250) -> dict[str, Any]:
    """Medians (µs) of request/response round trips, 1 connection per path, the
    three paths side by side in ABAB order: client -> Envoy -> server, client ->
    A -(SK_SKB_VERDICT alone)-> U -> server -(sk_skb on U)-> A -> client, client -> server."""
    req = b"GET /lat HTTP/1.1\r\nHost: x\r\n\r\n"
    samples: dict[str, list[float]] = {"envoy": [], "kernel": [], "direct": []}
    per_round_medians: dict[str, list[float]] = {k: [] for k in samples}
    with contextlib.ExitStack() as st:
        r.configure(True, "fwd")
        up = r.netns.connect(SERVER_PORT)
        st.callback(up.close)
        st.enter_context(contextlib.closing(Peer(r.server.accept()[0], server_answer)))
        bpfsys.map_update(r.fd["gk_up"], ct.c_uint64(UP_KEY), ct.c_uint32(up.fileno()))
        st.callback(bpfsys.map_delete, r.fd["gk_up"], ct.c_uint64(UP_KEY))
        conns: dict[str, socket.socket] = {}
        for name, port in (("kernel", GW_PORT), ("direct", SERVER_PORT), ("envoy", ENVOY_PORT)):
            conns[name] = r.netns.connect(port)
            st.callback(conns[name].close)
        r.configure(True, "fwd", client_key=conns["kernel"].getsockname()[1])
        acc = r.gw.accept()[0]
        gateway = Peer(acc)
        st.callback(gateway.close)
        st.callback(AcceptLoop(r.server, server_answer).close)  # direct, then Envoy's
        bad: dict[str, int] = {k: 0 for k in samples}
        for _ in range(rounds):
            for name in samples:
                times = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    resp, rest = exchange(conns[name], req)
                    times.append((time.perf_counter() - t0) * 1e6)
                    bad[name] += int(not resp.endswith(SERVER_BODY) or bool(rest))
                samples[name] += times
                per_round_medians[name].append(round(statistics.median(times), 1))
        return {"scenario": "latency", "requests_per_path": rounds * per_round,
                "median_us": {k: round(statistics.median(v), 1) for k, v in samples.items()},
                "round_medians_us": per_round_medians, "bad_responses": bad,
                "gateway_saw": len(gateway.got), "envoy_alive": envoy.proc.poll() is None}


def envoy_edge(r: Repro) -> dict[str, Any]:
    """What the gateway-like Envoy (use_remote_address: true) does to an external
    client's request and to the response: the request the server got, the
    response head the client got."""
    req = (b"GET /edge HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 203.0.113.9\r\n"
           b"x-envoy-retry-on: 5xx\r\nx-envoy-upstream-rq-timeout-ms: 1\r\n"
           b"x-envoy-original-path: /forged\r\nx-request-id: client-chosen\r\n"
           b"x-forwarded-proto: https\r\n\r\n")
    with contextlib.ExitStack() as st:
        c = r.netns.connect(ENVOY_PORT)
        st.callback(c.close)
        c.sendall(req)
        srv = r.server.accept()[0]
        server = Peer(srv, server_answer)
        st.callback(server.close)
        resp, _ = exchange(c, b"")
        return {"scenario": "envoy-edge", "client_ip": CLIENT_IP, "sent": req.decode(),
                "server_got": server.got.decode("latin-1"),
                "client_got": resp.split(b"\r\n\r\n")[0].decode("latin-1")}


def main() -> None:
    r = Repro()
    try:
        print(json.dumps(r.catch()))
        for sc in SCENARIOS:
            print(json.dumps(r.run(sc)))
        if "latency" in sys.argv[1:]:
            from support.env import envoy_binary

            with tempfile.TemporaryDirectory(prefix="gk-envoy-") as wd:
                envoy = NetnsEnvoy(envoy_binary() or "envoy", r.netns, Path(wd))
                try:
                    print(json.dumps(envoy_edge(r)))
                    print(json.dumps(latency(r, envoy)))
                finally:
                    envoy.close()
    finally:
        r.close()


if __name__ == "__main__":
    main()
