"""fastpath.pools.Pools._shrink: surplus free sockets are closed, except one the
kernel bound between the look's read of dp_peer and the drain of its free queue
(under load, test_churn lost a request in flight that way: its upstream was
closed as surplus while the app answered, and the client timed out)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from fastpath.loader import socket_cookie
from fastpath.pools import EndpointKey, Pool, Pools


def test_a_socket_bound_meanwhile_is_not_closed_as_surplus() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        queue: list[int] = []  # the kernel's dp_free queue of pool 0
        dp = SimpleNamespace(pool_maps={0: None}, drop_peer=lambda cookie: None,
                             pop_free=lambda pid: queue.pop(0) if queue else None,
                             push_free=lambda pid, cookie: queue.append(cookie))
        pools = Pools(dp)
        socks = {socket_cookie(u): u for u, _ in pairs}
        a, b, c = socks
        pool = pools.pools[0] = Pool(0, EndpointKey("198.18.0.1", 80), socks=dict(socks),
                                     free=set(socks))
        queue += [a, b, c]
        queue.remove(b)  # sk_msg popped b for a client after the look read dp_peer
        with pools.mu:
            pools._shrink(pool, 3)
        assert set(pool.socks) == {b} and pool.free == set() and pool.taken == 1
        assert socks[b].fileno() != -1 and socks[a].fileno() == socks[c].fileno() == -1
        assert queue == []
        pools.ep.close()
    finally:
        for u, app in pairs:
            u.close()
            app.close()
