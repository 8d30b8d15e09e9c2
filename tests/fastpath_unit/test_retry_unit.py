"""Sans-I/O parts of the data path's retries (fastpath.retry)."""

from __future__ import annotations

import random

import pytest

from fastpath.plan import RetryPolicy
from fastpath.retry import (
    Backoff,
    FramingError,
    choose_pool,
    response_end,
    rpol_fields,
    with_attempt_count,
)


def test_content_length_framing() -> None:
    r = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nhello"
    assert response_end(r) == len(r)
    assert response_end(r[:-1]) is None
    assert response_end(r[:20]) is None
    assert response_end(r + b"HTTP/1.1 200") == len(r)  # first response only


def test_no_body_cases() -> None:
    head = b"HTTP/1.1 503 x\r\nContent-Length: 12\r\n\r\n"
    assert response_end(head, "HEAD") == len(head)
    for status in (b"204", b"304", b"100"):
        r = b"HTTP/1.1 " + status + b" x\r\n\r\n"
        assert response_end(r) == len(r)


def test_chunked_framing() -> None:
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"
    r = b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert response_end(r) == len(r)
    for cut in range(len(r) - 1):
        assert response_end(r[:cut]) is None, cut
    trailers = r[:-2] + b"grpc-status: 14\r\n\r\n"
    assert response_end(trailers) == len(trailers)


def test_close_delimited_and_errors() -> None:
    assert response_end(b"HTTP/1.0 503 x\r\nServer: a\r\n\r\nbody") is None  # ends at EOF
    with pytest.raises(FramingError):
        response_end(b"SSH-2.0\r\n\r\n")
    with pytest.raises(FramingError):
        response_end(b"HTTP/1.1 503 x\r\nContent-Length: z\r\n\r\n")


def test_envoy_backoff_intervals() -> None:
    """JitteredExponentialBackOffStrategy: [0,25), [0,50), [0,100), [0,200), [0,250)..."""
    b = Backoff(25, 250, random.Random(1))
    limits = [25, 50, 100, 200, 250, 250]
    for lim in limits:
        assert 0 <= b.next() < lim
    with pytest.raises(ValueError):
        Backoff(0, 10)
    seen = {Backoff(25, 250, random.Random(s)).next() for s in range(200)}
    assert min(seen) == 0 and max(seen) == 24  # the whole first interval is used


def test_attempt_count_rewrite() -> None:
    req = b"GET / HTTP/1.1\r\nHost: a\r\nx-envoy-attempt-count: 1\r\n\r\nx-envoy-attempt-count: 1\r\n"
    out = with_attempt_count(req, 3)
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: a\r\nx-envoy-attempt-count: 3\r\n\r\n")
    assert out.endswith(b"\r\n\r\nx-envoy-attempt-count: 1\r\n")  # the body is not touched
    plain = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert with_attempt_count(plain, 2) == plain


def test_previous_hosts_choice() -> None:
    rng = random.Random(7)
    for _ in range(50):
        assert choose_pool([1, 2], [1], True, 5, rng) == 2
        assert choose_pool([1, 2, 3], [1, 3], True, 1, rng) == 2
        assert choose_pool([1], [1], True, 5, rng) == 1  # one endpoint: the same again
        assert choose_pool([1, 2], [1, 2], True, 5, rng) in (1, 2)
    assert {choose_pool([1, 2], [1], False, 5, rng) for _ in range(50)} == {1, 2}
    assert choose_pool([], [], True, 5, rng) is None


def test_policy_record() -> None:
    f = rpol_fields(RetryPolicy(num_retries=2, status_codes=(503,), grpc_codes=(1, 14)), 2**40)
    assert (f.num_retries, f.n_codes, f.codes, f.max_retries) == (2, 1, (503,), 2**32 - 1)
    assert f.grpc_mask == (1 << 1) | (1 << 14)
    with pytest.raises(ValueError):
        rpol_fields(RetryPolicy(status_codes=tuple(range(500, 510))), 3)
