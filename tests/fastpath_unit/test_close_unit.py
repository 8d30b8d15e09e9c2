"""The agent half of a close in a response (fastpath.agent_close) without a
kernel: what a close of U's app means for its client from U's dp_peer value,
and the wait value a forwarded request leaves (HEAD: no body to count)."""

from __future__ import annotations

from types import SimpleNamespace

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
