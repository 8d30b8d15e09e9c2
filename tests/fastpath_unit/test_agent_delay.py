"""fastpath.agent_delay.Delayer without a kernel: the maps are dicts, U and the
app are the two ends of a socketpair (the kernel's redirect into U's receive
queue is a write from the app's end). Held for the delay then sent; a client
that closes first cancels it; a record of a client no longer bound is dropped."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace
from typing import Any

from fastpath.agent_delay import Delayer
from fastpath.loader import socket_cookie


class Key:
    def __init__(self, value: int = 0, **fields: int) -> None:
        self.value = value
        self.__dict__.update(fields)

    def ident(self) -> Any:
        return tuple(sorted(self.__dict__.items()))


class Table:
    """The part of a BCC table the Delayer uses."""

    Key = Key

    def __init__(self) -> None:
        self.d: dict[Any, tuple[Key, Any]] = {}

    @staticmethod
    def Leaf(**f: int) -> Any:  # noqa: N802 (BCC's name)
        return SimpleNamespace(**f)

    def __getitem__(self, k: Key) -> Any:
        return self.d[k.ident()][1]

    def __setitem__(self, k: Key, v: Any) -> None:
        self.d[k.ident()] = (k, v)

    def __delitem__(self, k: Key) -> None:
        del self.d[k.ident()]

    def items(self) -> list[tuple[Key, Any]]:
        return list(self.d.values())

    def keys(self) -> list[Key]:
        return [k for k, _ in self.d.values()]


def setup(n: int) -> tuple[Delayer, dict[str, Table], list[tuple[socket.socket, socket.socket, int]]]:
    maps = {"dp_dly": Table(), "dp_peer": Table(), "dp_dpol": Table()}
    pairs = []
    socks = {}
    for _ in range(n):
        u, app = socket.socketpair()
        up = socket_cookie(u)
        pairs.append((u, app, up))
        socks[up] = u
    pools = SimpleNamespace(owner={up: 0 for up in socks}, pools={0: SimpleNamespace(socks=socks)})
    return Delayer(SimpleNamespace(bpf=maps), pools), maps, pairs


def hold(maps: dict[str, Table], app: socket.socket, up: int, client: int, req: bytes,
         ms: int) -> None:
    """What dp_delay_hold does: record, bytes into U's receive queue."""
    maps["dp_peer"][Key(up)] = SimpleNamespace(client=client, wait=0)
    maps["dp_dly"][Key(up)] = SimpleNamespace(client=client, t_ns=time.monotonic_ns(),
                                              len=len(req), delay_ms=ms)
    app.sendall(req)


def test_held_then_sent_and_cancelled() -> None:
    delayer, maps, ((u1, app1, up1), (u2, app2, up2), (u3, app3, up3)) = setup(3)
    req = b"POST /d HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nhello"
    delayer.start()
    try:
        t0 = time.monotonic()
        hold(maps, app1, up1, 11, req, 150)
        hold(maps, app2, up2, 22, req, 150)
        maps["dp_dly"][Key(up3)] = SimpleNamespace(client=33, t_ns=time.monotonic_ns(),
                                                   len=len(req), delay_ms=150)  # not bound
        delayer.wake()
        assert delayer.claim(up1)  # readable with a held request: not an EOF
        time.sleep(0.05)
        delayer.on_close(22, [up2])  # the second client gives up during the delay
        app1.settimeout(2)
        got = b""
        while len(got) < len(req):
            got += app1.recv(65536)
        assert got == req
        assert 0.15 <= time.monotonic() - t0 < 1.0
        app2.settimeout(0.3)
        try:
            extra = app2.recv(65536)
        except TimeoutError:
            extra = b""
        assert extra == b""  # never sent
        assert not maps["dp_dly"].items()
        stats = delayer.debug()
        assert stats["sent"] == 1 and stats["cancelled"] == 2 and stats["held"] == 0, stats
        assert not delayer.claim(up1)
    finally:
        delayer.close()
        for s in (u1, app1, u2, app2, u3, app3):
            s.close()


def test_program_writes_the_generation() -> None:
    delayer, maps, _ = setup(0)
    fd = SimpleNamespace(delay_ms=300, per_million=500_000)
    from fastpath.plan import Verdict

    routes = [SimpleNamespace(fault_delay=None, verdict=Verdict.KERNEL, fault_abort=None),
              SimpleNamespace(fault_delay=fd, verdict=Verdict.KERNEL, fault_abort=None),
              SimpleNamespace(fault_delay=fd, verdict=Verdict.ENVOY, fault_abort=None), None]
    maps["dp_dpol"][Key(gen=1, route=9)] = SimpleNamespace()
    delayer.program(SimpleNamespace(routes=routes), 1)
    assert [(k.gen, k.route, v.delay_ms, v.per_million, v.abort_reply)
            for k, v in maps["dp_dpol"].items()] == [(1, 2, 300, 500_000, 0)]


class RacingDly(Table):
    """dp_dly whose next lookup first lets the delay thread take a turn, as a
    loaded machine schedules it: the held request is scanned and read (its record
    deleted) between the claim's two looks."""

    def __init__(self) -> None:
        super().__init__()
        self.before_lookup: Any = None

    def __getitem__(self, k: Key) -> Any:
        turn, self.before_lookup = self.before_lookup, None
        if turn is not None:
            turn()
        return super().__getitem__(k)


def test_claim_sees_a_request_the_thread_takes_meanwhile() -> None:
    """A readable U whose held request moves from the record to `held` during
    claim() is still the delayer's: False made the pools offer U to the reset
    agent, which answered the waiting request 503 (test_delay's /s/1 under load)."""
    delayer, maps, ((u, app, up),) = setup(1)
    maps["dp_dly"] = racing = RacingDly()
    req = b"GET /s/1 HTTP/1.1\r\nHost: a\r\n\r\n"
    try:
        hold(maps, app, up, 11, req, 200)

        def thread_turn() -> None:
            with delayer.cv:
                delayer._turn()

        racing.before_lookup = thread_turn
        assert delayer.claim(up)
        assert delayer.debug()["held"] == 1 and not racing.items()  # read, not sent yet
    finally:
        delayer.close()
        u.close()
        app.close()
