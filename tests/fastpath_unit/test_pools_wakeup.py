"""fastpath.pools._woke_empty: a pooled upstream's readiness is reaped (or
answered 503 by the reset agent) only at EOF, error or data, never on a
wake-up with an empty queue (seen under load in test_churn's kill test: EPOLLIN,
then EAGAIN, and a request in flight answered 503 while its response was coming)."""

from __future__ import annotations

import socket
import struct

from fastpath.pools import _woke_empty


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
