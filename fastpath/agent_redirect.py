"""The agent's half of the data path's redirect routes (the kernel half:
bpf_src/dp_redir.h).

Owner: the redirect part of K2. One `Redirector` per node datapath:
`program()` at each plan apply (agent threads, before the generation flip),
`on_event()` for a DP_EV_REDIRECT record (the agent's event thread), `close()`
by the node.

The kernel popped a request of a KERNEL redirect route and posted its head. The
reply is built here with `fastpath.reference.location` (the reference model's
Location, compared with Envoy 1.40 by tests/split/test_differential.py) and
injected at once into the client's receive queue (dp_inj slot 2). What Envoy
1.40 sends, and this too: the status (302 unless response_code says
otherwise), `location`, `date`, `server: envoy`, `content-length: 0`; for HEAD
`transfer-encoding: chunked` and no body instead of the content-length.
"""

from __future__ import annotations

import ctypes as ct
import email.utils
import http
import logging
import threading
from collections import Counter
from typing import Any

from fastpath.loader import drop_generation
from fastpath.plan import KernelPlan, Redirect, Route, Verdict
from fastpath.reference import Request, location
from fastpath.timeouts import LazyInjector

log = logging.getLogger(__name__)

REDIR_MAX = 1024  # DP_REDIR_MAX
INJECTOR_SLOT = 2  # dp_inj: 0 the route timeouts', 1 the fault delays'


class RedirEvent(ct.Structure):
    """struct dp_redir_ev (bpf_src/dp_redir.h)."""

    _fields_ = [("kind", ct.c_uint32), ("route", ct.c_uint32), ("gen", ct.c_uint32),
                ("len", ct.c_uint32), ("cookie", ct.c_uint64), ("head", ct.c_uint8 * REDIR_MAX)]


def needs_redirect(plan: KernelPlan) -> bool:
    """True when a KERNEL route of `plan` is a redirect: the node's program is
    then compiled with -DDP_REDIR=1."""
    return any(r.verdict is Verdict.KERNEL and isinstance(r.action, Redirect)
               for lst in plan.listeners for vh in lst.virtual_hosts for r in vh.routes)


def parse_head(head: bytes) -> Request | None:
    """(method, target, Host) of a request head as the kernel accepted it, or None."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
    except ValueError:
        return None
    hosts = [ln.split(":", 1)[1].strip() for ln in lines[1:]
             if ":" in ln and ln.split(":", 1)[0].strip().lower() == "host"]
    if len(hosts) != 1 or not target.startswith("/"):
        return None
    return Request(method=method, path=target, host=hosts[0])


def redirect_reply(a: Redirect, r: Route, req: Request, date: str | None = None) -> bytes:
    """The whole response Envoy 1.40 sends for redirect route `r` and `req`."""
    try:
        phrase = http.HTTPStatus(a.status).phrase
    except ValueError:
        phrase = "Unknown"
    date = date or email.utils.formatdate(usegmt=True)
    length = "transfer-encoding: chunked" if req.method == "HEAD" else "content-length: 0"
    return (f"HTTP/1.1 {a.status} {phrase}\r\nlocation: {location(a, r.match, req)}\r\n"
            f"date: {date}\r\nserver: envoy\r\n{length}\r\n\r\n").encode("latin-1")


def placeholders(sp: Any) -> dict[int, int]:
    """Route id -> its placeholder reply's index in l7fp_replies (the decision's
    REPLY for a redirect route, fastpath.synth_tables), from the synthesized rows."""
    rows = getattr(sp, "rows", {}) or {}
    if "l7fp_routes" not in rows:
        return {}
    from fastpath import bpf_structs as bs

    st = bs.structs(sp.knobs)
    out = {}
    for raw in rows["l7fp_routes"]:
        row = st.Route.from_buffer_copy(raw.ljust(ct.sizeof(st.Route), b"\0"))
        out[int(row.route_id)] = int(row.reply)
    return out


class Redirector:
    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.lock = threading.Lock()
        self.routes: dict[tuple[int, int], Route] = {}  # (gen, route id + 1) -> route
        self.stats: Counter[str] = Counter()
        self.injector = LazyInjector(dp, slot=INJECTOR_SLOT)

    def program(self, sp: Any, gen: int) -> None:
        """Write generation `gen` of dp_rdpol and keep its redirect routes."""
        t = self.dp.bpf["dp_rdpol"]
        drop_generation(t, gen)
        ids = placeholders(sp)
        with self.lock:
            self.routes = {k: v for k, v in self.routes.items() if k[0] != gen}
            for rid, r in enumerate(getattr(sp, "routes", ())):
                if r is None or not isinstance(r.action, Redirect) or rid not in ids:
                    continue
                self.routes[(gen, rid + 1)] = r
                t[t.Key(gen=gen, route=rid + 1)] = t.Leaf(reply=ids[rid] + 1)

    def on_event(self, data: Any, size: int) -> None:
        """DP_EV_REDIRECT: answer the popped request now."""
        ev = ct.cast(data, ct.POINTER(RedirEvent)).contents
        head = bytes(ev.head[:min(int(ev.len), REDIR_MAX)])
        with self.lock:
            r = self.routes.get((int(ev.gen), int(ev.route)))
        req = parse_head(head)
        if r is None or req is None or not isinstance(r.action, Redirect):
            # the request is gone already: nothing correct to send (not seen: the
            # kernel's decision accepted this head for this route)
            self.stats["unanswerable"] += 1
            log.warning("redirect: route %d gen %d, head %r: cannot answer",
                        int(ev.route), int(ev.gen), head[:200])
            return
        self._send(int(ev.cookie), redirect_reply(r.action, r, req))

    def _send(self, client: int, data: bytes) -> None:
        if self.injector.send(client, data):
            self.stats["sent"] += 1
        else:
            self.stats["client_gone"] += 1

    def close(self) -> None:
        self.injector.close()

    def debug(self) -> dict[str, Any]:
        return dict(self.stats)
