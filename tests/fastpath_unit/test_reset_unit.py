"""The agent half of reset detection (fastpath.agent_reset) without a kernel:
what a close of U's app means from its dp_peer value and dp_tmo record, and
Envoy's 503 bytes (as a real Envoy 1.40 sent them, tests/kernel_datapath/test_reset.py)."""

from __future__ import annotations

from types import SimpleNamespace

from fastpath.agent_reset import action, retries_reset
from fastpath.timeouts import DP_TMO_STARTED, reset_reply


def test_a_waiting_request_is_reset_unless_the_timer_may_answer() -> None:
    waiting, answered = SimpleNamespace(client=7, wait=1), SimpleNamespace(client=7, wait=0)
    assert action(None, None) == "none"  # U not bound to a client
    assert action(answered, None) == "none"  # the response started: no 503
    assert action(waiting, None) == "reset"
    assert action(waiting, SimpleNamespace(state=2)) == "claim"  # timed: claim first
    assert action(waiting, SimpleNamespace(state=DP_TMO_STARTED)) == "none"


def test_reset_reply_is_envoys_local_reply() -> None:
    raw = reset_reply("Thu, 26 Nov 2026 15:03:58 GMT")
    # the bytes of Envoy 1.40's answer, without its `server: envoy`
    assert raw == (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 95\r\n"
                   b"content-type: text/plain\r\ndate: Thu, 26 Nov 2026 15:03:58 GMT\r\n\r\n"
                   b"upstream connect error or disconnect/reset before headers. "
                   b"reset reason: connection termination")


def test_a_reset_is_retried_where_the_policy_retries_a_503() -> None:
    def rec(state: int = 1, left: int = 2, codes: tuple[int, ...] = (503,),
            max_retries: int = 3) -> SimpleNamespace:
        pol = SimpleNamespace(codes=list(codes) + [0] * (8 - len(codes)), n_codes=len(codes),
                              max_retries=max_retries)
        return SimpleNamespace(state=state, left=left, pol=pol)

    assert retries_reset(rec(), busy=0)  # istiod's default policy
    assert not retries_reset(None, busy=0)  # no kernel retry on this route
    assert not retries_reset(rec(left=0), busy=0)  # the last attempt: answered 503
    assert not retries_reset(rec(codes=(502, 504)), busy=0)
    assert not retries_reset(rec(state=2), busy=0)  # already diverted
    assert not retries_reset(rec(), busy=3)  # the cluster's max_retries pending
    assert retries_reset(rec(codes=(5,)), busy=0)  # retry_on 5xx: the class
    assert retries_reset(rec(codes=(502, 503, 504)), busy=0)  # gateway-error
    # a per-try timeout the policy retries: any status, the same other checks
    assert retries_reset(rec(codes=()), busy=0, any_status=True)
    assert not retries_reset(rec(left=0), busy=0, any_status=True)
    assert not retries_reset(rec(), busy=3, any_status=True)
