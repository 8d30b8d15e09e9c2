"""Sans-I/O parts of the data path's retries: response framing, Envoy's backoff,
the attempt-count header, the endpoint choice, the kernel's policy record.

Owner: the retry part of K2. Used by `fastpath.agent_retry` (the I/O half),
which reads a diverted response from an upstream socket until `response_end`
says it is complete, waits `backoff_ms`, and re-sends the request copy the
kernel kept (bpf_src/dp_retry.h), rewritten by `with_attempt_count`, on the
endpoint `choose_pool` picks. Every function here is pure.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastpath.plan import RetryPolicy

RETRY_CODES = 8  # DP_RETRY_CODES of dp_retry.h
_NO_BODY = {204, 304}


class FramingError(ValueError):
    """The bytes are not an HTTP/1.x response the agent can delimit."""


def _headers(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise FramingError(f"not an HTTP/1 status line: {lines[0][:60]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise FramingError(f"bad header line {line[:60]!r}")
        key = name.strip().lower().decode("latin-1")
        fields[key] = (fields[key] + "," if key in fields else "") + value.strip().decode("latin-1")
    return int(parts[1]), fields


def response_end(buf: bytes, method: str = "GET") -> int | None:
    """Length of the first complete response in `buf`, or None if more bytes are
    needed. A response delimited by the connection's close (no Content-Length,
    not chunked) is never complete here: the caller ends it at EOF."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    body_at = head_end + 4
    status, fields = _headers(buf[:head_end])
    if method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
        return body_at
    te = fields.get("transfer-encoding", "").lower()
    if te:
        if te.split(",")[-1].strip() != "chunked":
            return None  # close-delimited
        return _chunked_end(buf, body_at)
    if "content-length" in fields:
        try:
            n = int(fields["content-length"].split(",")[0])
        except ValueError as exc:
            raise FramingError(f"bad content-length {fields['content-length']!r}") from exc
        return body_at + n if len(buf) >= body_at + n else None
    return None


def _chunked_end(buf: bytes, at: int) -> int | None:
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size_txt = buf[at:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_txt, 16)
        except ValueError as exc:
            raise FramingError(f"bad chunk size {size_txt[:20]!r}") from exc
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # trailers end with a blank line
            if buf[eol:eol + 4] == b"\r\n\r\n":
                return eol + 4
            return end + 4 if end >= 0 else None
        at = eol + 2 + size + 2
        if len(buf) < at:
            return None


def request_method(req: bytes) -> str:
    return req.split(b" ", 1)[0].decode("latin-1", "replace")


class Backoff:
    """Envoy's JitteredExponentialBackOffStrategy (one per request): the n-th
    wait is uniform in [0, interval), interval = base, 2*base, 4*base ... capped
    at max_ms."""

    def __init__(self, base_ms: int, max_ms: int, rng: random.Random | None = None) -> None:
        if base_ms <= 0 or max_ms < base_ms:
            raise ValueError(f"backoff: base {base_ms} ms, max {max_ms} ms")
        self.max_ms = max_ms
        self.next_ms = base_ms
        self.rng = rng or random.Random()

    def next(self) -> int:
        cur = self.next_ms
        self.next_ms = cur * 2 if cur < self.max_ms // 2 else self.max_ms
        return min(self.rng.randrange(cur), self.max_ms)


_ATTEMPT = re.compile(rb"(?im)^(x-envoy-attempt-count:[ \t]*)\d+[ \t]*\r$")


def with_attempt_count(req: bytes, attempt: int) -> bytes:
    """The request copy with x-envoy-attempt-count set to `attempt` (only where
    the kernel inserted it: the virtual host's include_request_attempt_count)."""
    head_end = req.find(b"\r\n\r\n")
    if head_end < 0:
        return req
    head = _ATTEMPT.sub(lambda m: m.group(1) + str(attempt).encode() + b"\r", req[:head_end + 2])
    return head + req[head_end + 2:]


def choose_pool(pools: Sequence[int], tried: Sequence[int], previous_hosts: bool,
                attempts: int, rng: random.Random) -> int | None:
    """The endpoint (pool) of a retry, as Envoy's LB with the previous_hosts
    predicate: up to `attempts` re-picks avoiding hosts already tried, then
    the last pick; without the predicate any endpoint."""
    if not pools:
        return None
    pick = rng.choice(list(pools))
    if not previous_hosts:
        return pick
    fresh = [p for p in pools if p not in tried]
    if fresh:
        return rng.choice(fresh) if attempts >= 1 else pick
    return pick


@dataclass(frozen=True)
class RpolFields:
    """struct dp_rpol (dp_retry.h) of one route."""

    num_retries: int
    grpc_mask: int
    n_codes: int
    max_retries: int
    codes: tuple[int, ...]


def rpol_fields(policy: RetryPolicy, max_retries: int) -> RpolFields:
    """struct dp_rpol of a route's policy; ValueError for a policy the record
    cannot hold (the classifier makes such routes ENVOY)."""
    if len(policy.status_codes) > RETRY_CODES:
        raise ValueError(f"{len(policy.status_codes)} retriable status codes (max {RETRY_CODES})")
    mask = 0
    for g in policy.grpc_codes:
        if not 0 <= g < 32:
            raise ValueError(f"grpc code {g}")
        mask |= 1 << g
    return RpolFields(policy.num_retries, mask, len(policy.status_codes),
                      min(max_retries, 2**32 - 1), tuple(policy.status_codes))
