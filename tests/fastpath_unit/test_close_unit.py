"""The agent half of a close in a response (fastpath.agent_close) without a
kernel: what a close of U's app means for its client from U's dp_peer value,
and the wait value a forwarded request leaves (HEAD: no body to count)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from fastpath.agent_close import DP_LEFT_UNKNOWN, DP_WAIT_HEAD, action, wait_value


def peer(wait: int, left: int) -> SimpleNamespace:
    return SimpleNamespace(client=7, wait=wait, left=left)


def test_a_started_response_not_complete_closes_the_client() -> None:
    assert action(None) == "none"  # no client bound to U
    assert action(peer(1, 0)) == "none"  # no response byte yet: the reset agent's 503
    assert action(peer(1 | DP_WAIT_HEAD, 0)) == "none"
    assert action(peer(0, 0)) == "none"  # the response passed whole (or U idle): kept
    assert action(peer(0, 6)) == "eof"  # 6 Content-Length bytes never came
    assert action(peer(0, DP_LEFT_UNKNOWN)) == "eof"  # chunked, close-delimited: the end


def test_wait_value_marks_head_requests() -> None:
    assert wait_value(b"GET / HTTP/1.1\r\n\r\n") == 1
    assert wait_value(b"HEAD / HTTP/1.1\r\n\r\n") == 1 | DP_WAIT_HEAD
    assert wait_value(b"HEADER / HTTP/1.1\r\n\r\n") == 1


def diag_reply(entries: list[tuple[str, int, int]], done: bool = True) -> bytes:
    """netlink SOCK_DIAG replies (struct inet_diag_msg) for (dst, dport, cookie)."""
    import socket
    import struct

    out = b""
    for dst, dport, cookie in entries:
        msg = struct.pack("=BBBB", 2, 1, 0, 0) + struct.pack(">HH", 40000, dport) + \
            socket.inet_aton("198.18.0.2") + bytes(12) + socket.inet_aton(dst) + bytes(12) + \
            struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32) + bytes(20)
        out += struct.pack("=IHHII", 16 + len(msg), 20, 2, 1, 0) + msg
    if done:
        out += struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    return out


def test_the_client_destination_is_found_by_cookie() -> None:
    from fastpath.agent_lost import find_destination

    batch = diag_reply([("198.19.0.3", 9000, 5), ("198.19.0.4", 9100, 7 << 32 | 9)], done=False)
    assert find_destination(batch, 7 << 32 | 9) == ("198.19.0.4", 9100)
    assert find_destination(batch, 6) is None  # more batches follow
    assert find_destination(diag_reply([("198.19.0.3", 9000, 5)]), 6) is True  # dump over


def test_response_end_follows_content_length_and_chunks() -> None:
    from fastpath.retry import response_end  # what the handoff (agent_lost) reads answers with

    cl = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbody"
    assert response_end(cl) == len(cl) and response_end(cl[:-1]) is None
    assert response_end(cl + b"HTTP/1.1") == len(cl)
    ch = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert response_end(ch) == len(ch) and response_end(ch[:-2]) is None
    assert response_end(b"HTTP/1.1 200 OK\r\n\r\nuntil the close") is None


def no_peers(**peers: Any) -> Any:
    """A stand-in for the Closer's datapath: only its dp_peer table (upstream
    cookie -> value with client and wait), empty unless given."""
    from types import SimpleNamespace

    return SimpleNamespace(bpf={"dp_peer": dict(peers)})


def test_eofs_after_kernel_replies_wait_for_the_reply(monkeypatch: Any) -> None:
    """Closer.after_reply (event thread) queues the EOF; service() sends it once
    AFTER_REPLY_S passed (the reply lands when the sk_msg program returns)."""
    import fastpath.agent_close as ac

    sent: list[int] = []
    closer = ac.Closer(dp=no_peers())
    monkeypatch.setattr(closer, "send_eof", lambda client: sent.append(client) or True)
    now = [100.0]
    monkeypatch.setattr(ac.time, "monotonic", lambda: now[0])
    closer.after_reply(7)
    closer.service()
    assert sent == []  # not before the margin
    now[0] += ac.AFTER_REPLY_S
    closer.service()
    closer.service()
    closer.drain()
    assert sent == [7] and closer.counts["close_after_reply"] == 1
    closer.close()


def test_eofs_leave_the_event_thread_in_order(monkeypatch: Any) -> None:
    """send_eof (milliseconds: a carrier and its FIN's passage) runs on the
    Closer's worker: service() returns at once, the EOFs go out in the order
    they were due."""
    import threading

    import fastpath.agent_close as ac

    sent: list[int] = []
    go = threading.Event()

    def slow_eof(client: int) -> bool:
        go.wait(5)  # held until the event thread's part is over
        sent.append(client)
        return client != 2  # the second one's FIN did not pass

    closer = ac.Closer(dp=no_peers())
    monkeypatch.setattr(closer, "send_eof", slow_eof)
    for client in (1, 2, 3):
        closer.after_reply(client)
    time.sleep(ac.AFTER_REPLY_S)
    closer.service()  # returns while the worker waits in slow_eof
    assert sent == []
    go.set()
    closer.drain()
    closer.close()
    assert sent == [1, 2, 3]
    assert closer.counts == {"close_eof": 0, "close_failed": 1, "close_after_reply": 2,
                             "close_skipped": 0}


def test_close_drops_queued_eofs_and_stays_closed(monkeypatch: Any) -> None:
    """close() (before the datapath's maps close) waits for the EOF in
    progress, drops the queued ones unsent and ends the worker for good: no
    send_eof runs after it returns (it would write into closed, possibly
    reused, map fds), and an EOF asked for later starts no worker."""
    import threading

    import fastpath.agent_close as ac

    started, sent = threading.Event(), []
    in_send = [0]

    def slow_eof(client: int) -> bool:
        in_send[0] += 1
        started.set()
        time.sleep(0.2)  # a FIN that does not pass: EOF_WAIT_S
        sent.append(client)
        in_send[0] -= 1
        return True

    closer = ac.Closer(dp=no_peers())
    monkeypatch.setattr(closer, "send_eof", slow_eof)
    for client in range(10):
        closer._queue_eof(client, "close_eof")
    assert started.wait(5)
    closer.close()
    assert in_send == [0] and sent == [0]  # the one in progress ended, the rest dropped
    closer._queue_eof(11, "close_eof")
    closer.after_reply(12)
    time.sleep(ac.AFTER_REPLY_S)
    closer.service()
    time.sleep(0.3)
    assert sent == [0] and closer._worker is None
    closer.drain()  # nothing left unfinished


def test_handoffs_are_bounded(monkeypatch: Any) -> None:
    import threading

    import fastpath.agent_lost as al

    release = threading.Event()
    monkeypatch.setattr(al.Handoff, "_answer", lambda self, c, r: release.wait(5))
    monkeypatch.setattr(al, "MAX_IN_FLIGHT", 2)
    h = al.Handoff(dp=None, netns=None)
    for client in range(3):
        h.hand(client, b"GET / HTTP/1.1\r\n\r\n")
    assert h.counts["handed"] == 2 and h.counts["over_limit"] == 1
    release.set()


def test_handoff_finishing_after_close_makes_no_injector(monkeypatch: Any) -> None:
    """A handoff thread (not joined: it may wait ANSWER_S for Envoy) whose
    answer comes after Handoff.close (NodeDatapath.close, before the maps
    close) makes no Injector: no socket left open, no dp_inj write through a
    closed fd. Its answer counts as failed."""
    import threading

    import fastpath.agent_lost as al
    import fastpath.timeouts as tm

    made: list[int] = []
    monkeypatch.setattr(tm, "Injector", lambda dp, slot: made.append(slot))
    release = threading.Event()
    monkeypatch.setattr(al, "_ask_envoy", lambda c, r: release.wait(5) and b"HTTP/1.1 200 OK\r\n\r\n")
    h = al.Handoff(dp=None, netns=None)
    assert h.hand(5, b"GET / HTTP/1.1\r\n\r\n")
    h.close()
    release.set()
    deadline = time.monotonic() + 5
    while h.counts["failed"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.counts == {"handed": 1, "answered": 0, "failed": 1, "over_limit": 0}
    assert made == []
    assert h.injector.send(5, b"x") is False and made == []


def test_eof_of_a_client_that_moved_on_is_skipped(monkeypatch: Any) -> None:
    """A whole response taken as ended by the close: its client may send its
    next request before the queued EOF leaves. The worker skips the EOF of a
    client seen sending since (a DP_EV_CLOSE: its request went to Envoy; or a
    request of it waiting on an upstream in dp_peer), sends the others."""
    import threading
    from types import SimpleNamespace

    import fastpath.agent_close as ac

    peer = SimpleNamespace
    assert ac.forwarded([(1, peer(client=3, wait=1)), (2, peer(client=4, wait=0))], 3)
    assert not ac.forwarded([(2, peer(client=4, wait=0))], 4)  # its response came: idle
    assert not ac.forwarded([(5, peer(client=3, wait=ac.DP_WAIT_EOF))], 3)  # a carrier

    go, sent = threading.Event(), []

    def held_eof(client: int) -> bool:
        go.wait(5)
        sent.append(client)
        return True

    closer = ac.Closer(dp=no_peers(u9=peer(client=3, wait=1 | ac.DP_WAIT_HEAD)))
    monkeypatch.setattr(closer, "send_eof", held_eof)
    for client in (1, 2, 3, 4, 2):
        closer._queue_eof(client, "close_eof")
    closer.moved_on(2)  # DP_EV_CLOSE of a client with EOFs queued: both skipped
    closer.moved_on(7)  # of one without: nothing to skip later
    go.set()
    closer.drain()
    closer._queue_eof(7, "close_eof")
    closer._queue_eof(2, "close_eof")  # queued after its DP_EV_CLOSE: sent
    closer.drain()
    closer.close()
    assert sent == [1, 4, 7, 2]
    assert closer.counts["close_skipped"] == 3 and closer.counts["close_eof"] == 4
