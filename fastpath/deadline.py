"""One deadline over all attempts of a request: a retry takes its request's timer along.

Owner: the deadline part of K2 (route timeouts with retries, per-try timeouts).
Called by `fastpath.agent_retry.Retrier` (the agent thread) right before it
re-sends a request whose route has a timer (`claim`, then `rearm` or
`unclaim`); the pure functions are also used by the unit tests.

The kernel keeps a timed request's record in dp_tmo[U] (bpf_src/dp_timeout.h)
and the right to answer its client in dp_tmo_armed[U]: whoever deletes that key
first (the kernel on the first response byte, the timer thread of
`fastpath.timeouts` on expiry, or the retry agent here) owns the client's
receive queue for this request. A diverted response (a retry) leaves the
record armed: its route deadline keeps running through the read and the
backoff, as Envoy's router does (its global timer spans every attempt). The
retry agent then claims it; lost means the timer thread already answered 504,
so the retry is dropped (Envoy: no retry after the route timeout). Won, the
record moves to the upstream the retry goes out on, with a fresh per-try
deadline (Envoy restarts the per-try timer for each attempt) but the same
route deadline.
"""

from __future__ import annotations

import ctypes as ct
import re
from typing import Any

from fastpath import bpfsys

MS = 1_000_000
TMO_WAIT = 2  # bpf_src/dp_timeout.h DP_TMO_WAIT


def next_deadline(global_ns: int, try_ms: int, now_ns: int) -> int:
    """The record's deadline for an attempt starting at `now_ns`: the earlier of
    the route deadline (0: none) and the attempt's per-try deadline (0 ms: none)."""
    d = now_ns + try_ms * MS if try_ms else global_ns
    return min(global_ns, d) if global_ns else d


def expected_timeout_ms(timeout_ms: int, try_ms: int, global_ns: int, now_ns: int) -> int | None:
    """x-envoy-expected-rq-timeout-ms of an attempt sent at `now_ns`, as Envoy's
    FilterUtility::setTimeoutHeaders computes it on a retry: the per-try timeout
    (else the route timeout), at most the route time left (whole ms elapsed since
    the request completed), at least 1. None: no timeout, no header."""
    expected = try_ms or timeout_ms
    if not expected:
        return None
    if timeout_ms and global_ns:
        elapsed = max(0, now_ns - (global_ns - timeout_ms * MS)) // MS
        expected = 1 if elapsed >= timeout_ms else min(expected, timeout_ms - elapsed)
    return expected


_EXPECTED = re.compile(rb"(?im)^(x-envoy-expected-rq-timeout-ms:[ \t]*)\d+[ \t]*\r$")


def with_expected_timeout(req: bytes, ms: int | None) -> bytes:
    """The request copy with x-envoy-expected-rq-timeout-ms set to `ms` where the
    kernel inserted it (the split adds it unless the router suppresses Envoy's
    headers; a client's own x-envoy-*timeout-ms sends the request to Envoy)."""
    head_end = req.find(b"\r\n\r\n")
    if ms is None or head_end < 0:
        return req
    head = _EXPECTED.sub(lambda m: m.group(1) + str(ms).encode() + b"\r", req[:head_end + 2])
    return head + req[head_end + 2:]


def _record(dp: Any, up: int) -> Any | None:
    return bpfsys.table_get(dp.bpf["dp_tmo"], up)


def claim(dp: Any, up: int) -> tuple[bool, Any | None]:
    """Take the timed request on `up` for a retry: (a record was there, the
    record if this claim won). (True, None): the timer thread answered it
    already; (False, None): no record (an untimed route, or the timer thread
    answered and removed it: the caller tells them apart by the plan)."""
    rec = _record(dp, up)
    if rec is None:
        return False, None
    if not bpfsys.map_delete(dp.fds["dp_tmo_armed"], ct.c_uint64(up)):
        return True, None
    return True, rec


def unclaim(dp: Any, up: int) -> None:
    """The retry could not be sent: the record stays on `up`, armed again, so the
    timer still answers the client at the route deadline."""
    bpfsys.map_update(dp.fds["dp_tmo_armed"], ct.c_uint64(up), ct.c_uint32(1))


def rearm(dp: Any, old: int, new: int, rec: Any, now_ns: int) -> None:
    """Move a claimed record to `new`, the upstream the retry goes out on (before
    the request is sent, so its response finds it): same client and route
    deadline, a fresh per-try deadline."""
    rec.deadline_ns = next_deadline(int(rec.global_ns), int(rec.try_ms), now_ns)
    rec.state = TMO_WAIT
    rec.left = 0
    t = dp.bpf["dp_tmo"]
    t[t.Key(new)] = rec
    bpfsys.map_update(dp.fds["dp_tmo_armed"], ct.c_uint64(new), ct.c_uint32(1))
    if new != old:
        bpfsys.map_delete(dp.fds["dp_tmo"], ct.c_uint64(old))
