"""Minimal sk_msg reproducer (framing): what cork, pop, apply_bytes and a
reply rewrite do to the bytes of later writes on this kernel.

Owner: framing (K2). Run as root: `python tests/kernel_datapath/skmsg_repro.py`
prints, per scenario, the program's log (size seen, helper returns) and the
bytes that arrived at the normal peer (A: where SK_PASS goes, Envoy in the
data path), at the redirect target's peer (B: the upstream) and in the
writer's own receive queue (C: a kernel reply). test_skmsg_semantics.py
asserts the behaviour bpf_src/sk_msg.c relies on.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fastpath import bpfsys

SRC = Path(__file__).with_name("skmsg_repro.c")
MODES = {"cork": 1, "popall": 2, "popself": 3, "apply": 4, "applyself": 5, "replycut": 6, "corkin": 7}


def _drain(s: socket.socket, wait: float = 0.15) -> bytes:
    s.settimeout(wait)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except (TimeoutError, BlockingIOError, OSError):
        pass
    return out


class Repro:
    """One loaded program with its map; `run()` makes fresh sockets per scenario."""

    def __init__(self) -> None:
        from bcc import BPF

        self.b: Any = BPF(text=SRC.read_text().encode())
        self.prog = self.b.load_func("rp_verdict", BPF.SK_MSG).fd
        self.map_fd = bpfsys.table_fd(self.b, "rp_socks")
        self.link = bpfsys.link_create(self.prog, self.map_fd, bpfsys.SK_MSG_VERDICT)
        if self.link < 0:
            bpfsys.prog_attach(self.prog, self.map_fd, bpfsys.SK_MSG_VERDICT)

    def close(self) -> None:
        if self.link >= 0:
            os.close(self.link)
        else:
            bpfsys.prog_detach(self.prog, self.map_fd, bpfsys.SK_MSG_VERDICT)
        self.b.cleanup()

    def run(self, mode: str, writes: list[bytes], cork_to: int = 0, apply: int = 0,
            reply_len: int = 0, pause: float = 0.05) -> dict[str, Any]:
        cfg = self.b["rp_cfg_m"]
        v = cfg[0]
        v.mode, v.cork_to, v.apply, v.reply_len = MODES[mode], cork_to, apply, reply_len
        cfg[0] = v
        self.b["rp_n"].clear()
        self.b["rp_log"].clear()
        lsn = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(lsn.getsockname())
        a, _ = lsn.accept()
        t = socket.create_connection(lsn.getsockname())
        b, _ = lsn.accept()
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            bpfsys.map_update(self.map_fd, ct.c_uint64(2), ct.c_uint32(t.fileno()))
            bpfsys.map_update(self.map_fd, ct.c_uint64(1), ct.c_uint32(c.fileno()))
            sent = []
            for w in writes:
                try:
                    sent.append(c.send(w))
                except OSError as e:
                    sent.append(f"{type(e).__name__}: {e.strerror}")
                time.sleep(pause)
            got = {"A_normal": _drain(a), "B_target": _drain(b), "C_ingress": _drain(c),
                   "T_ingress": _drain(t)}
        finally:
            bpfsys.map_delete(self.map_fd, ct.c_uint64(1))
            bpfsys.map_delete(self.map_fd, ct.c_uint64(2))
            for s in (c, a, t, b, lsn):
                s.close()
        n = self.b["rp_n"][0].value
        log = [self.b["rp_log"][i] for i in range(min(n, 64))]
        return {"mode": mode, "sent": sent,
                "log": [(r.size, r.r1, r.r2, r.size_after) for r in log],
                **{k: v.decode("latin-1") for k, v in got.items()}}


SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("cork", {"writes": [b"GET /a HT", b"TP/1.1\r\n\r\n"], "cork_to": 19}),
    ("cork", {"writes": [b"GET /a HT", b"TP/1.1\r\n\r\n", b"NEXT"], "cork_to": 19}),
    ("corkin", {"writes": [b"GET /a HT", b"TP/1.1\r\n\r\n"], "cork_to": 19}),
    ("corkin", {"writes": [b"GET", b" /a HT", b"TP/1.1\r\n\r\n"], "cork_to": 19}),
    ("popall", {"writes": [b"swallow-me", b"then-this"]}),
    ("popself", {"writes": [b"swallow-me"]}),
    ("apply", {"writes": [b"first|second"], "apply": 6}),
    ("applyself", {"writes": [b"first|second"], "apply": 6}),
    ("replycut", {"writes": [b"POST / HTTP/1.1\r\n\r\nbo", b"dy-rest", b"more"],
                  "reply_len": 12}),
]


def main() -> None:
    r = Repro()
    try:
        for mode, kw in SCENARIOS[int(sys.argv[1]):int(sys.argv[2])] if len(sys.argv) > 2 \
                else SCENARIOS:
            print(json.dumps(r.run(mode, **kw)))
    finally:
        r.close()


if __name__ == "__main__":
    main()
