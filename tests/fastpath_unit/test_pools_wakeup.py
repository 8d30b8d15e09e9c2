"""fastpath.pools._woke_empty: a pooled upstream's readiness is reaped (or
answered 503 by the reset agent) only at EOF, error or data, never on a
wake-up with an empty queue (seen under load in test_churn's kill test: EPOLLIN,
then EAGAIN, and a request in flight answered 503 while its response was coming);
nor when the data a look saw was read meanwhile by the delay thread."""

from __future__ import annotations

import select
import socket
import struct
from types import SimpleNamespace

from fastpath.loader import socket_cookie
from fastpath.pools import EndpointKey, Pool, Pools, _woke_empty


def test_empty_queue_is_a_spurious_wakeup() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert _woke_empty(a)


def test_data_eof_and_error_are_not() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x")
        assert not _woke_empty(a)  # data: the retry/delay agents' to claim
        assert a.recv(1) == b"x"
        b.close()
        assert not _woke_empty(a)  # EOF: dead (reset agent, then reaped)
    assert not _woke_empty(None)


def test_reset_is_not() -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    with lst:
        c = socket.create_connection(lst.getsockname())
        srv, _ = lst.accept()
        with c:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            srv.close()  # RST
            assert not _woke_empty(c)


def _pools_with(u: socket.socket) -> tuple[Pools, int]:
    """Pools over a fake dp holding `u` (one end of a socketpair) as a bound upstream."""
    pools = Pools(SimpleNamespace(drop_peer=lambda cookie: None, pool_maps={}))
    up = socket_cookie(u)
    u.setblocking(False)
    pools.pools[0] = Pool(0, EndpointKey("198.18.0.1", 80), socks={up: u})
    pools.owner[up] = 0
    pools.fd_cookie[u.fileno()] = up
    pools.ep.register(u.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    return pools, up


def test_data_read_by_the_delay_thread_meanwhile_is_not_an_eof() -> None:
    """The look saw a held request's bytes; the delay thread read (and sent) them
    before the delayer was asked, so it says not ours: U is neither closed nor
    offered to the EOF agents (whose 503 would answer the request on its way)."""
    u, app = socket.socketpair()
    with u, app:
        pools, up = _pools_with(u)
        eof_asked: list[int] = []

        def delay_thread_read_it(cookie: int) -> bool:
            u.recv(4096)
            return False

        pools.claim = delay_thread_read_it
        pools.claim_eof = lambda cookie: eof_asked.append(cookie) is not None
        app.sendall(b"GET /s/1 HTTP/1.1\r\n\r\n")
        with pools.mu:
            pools._reap_dead()
        assert eof_asked == [] and up in pools.pools[0].socks
        app.close()  # a real EOF now: the EOF agents are asked, U is closed
        with pools.mu:
            pools._reap_dead()
        assert eof_asked == [up] and up not in pools.pools[0].socks
        pools.ep.close()


def test_a_next_request_arriving_during_the_claim_is_not_an_eof() -> None:
    """The delay thread read the held request during the look (not ours), and the
    keep-alive client's next request reached U before the second look: data, not
    EOF, so no 503 from the EOF agents; the next poll offers it to the claimers."""
    u, app = socket.socketpair()
    with u, app:
        pools, up = _pools_with(u)
        eof_asked: list[int] = []
        claimed: list[bytes] = []

        def read_it_and_the_next_one_comes(cookie: int) -> bool:
            if not claimed:
                claimed.append(u.recv(4096))
                app.sendall(b"GET /s/2 HTTP/1.1\r\n\r\n")
                return False
            claimed.append(u.recv(4096))
            return True

        pools.claim = read_it_and_the_next_one_comes
        pools.claim_eof = lambda cookie: eof_asked.append(cookie) is not None
        app.sendall(b"GET /s/1 HTTP/1.1\r\n\r\n")
        for _ in range(2):
            with pools.mu:
                pools._reap_dead()
        assert eof_asked == [] and up in pools.pools[0].socks
        assert claimed == [b"GET /s/1 HTTP/1.1\r\n\r\n", b"GET /s/2 HTTP/1.1\r\n\r\n"]
        pools.ep.close()
