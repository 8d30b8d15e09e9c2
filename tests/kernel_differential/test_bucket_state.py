"""Unit test of fastpath.agent_synth.keep_bucket_state (the fix for the rate
limit refilled by every plan re-apply, found by test_fastpath_onoff.py)."""

from __future__ import annotations

import struct
from typing import Any

from fastpath.agent_synth import keep_bucket_state


def bucket(max_tokens: int, tokens: int = 0, last_ns: int = 0) -> bytes:
    # struct l7fp_bucket: max, per_fill, interval_ns, status, reply, enforce, pad, tokens, last_ns
    return struct.pack("<QQQIIIIQQ", max_tokens, 5, 3_600_000_000_000, 429, 3, 1_000_000, 0,
                       tokens, last_ns)


class Table(dict):  # type: ignore[type-arg]
    """The two calls BCC's array table gets here: Key(i) and [key]."""

    @staticmethod
    def Key(i: int) -> int:  # noqa: N802 (BCC's name)
        return i


def key(i: int) -> bytes:
    return struct.pack("<I", i)


def test_same_config_keeps_live_state_other_config_starts_full() -> None:
    n = 4
    live: Any = Table({0: bucket(5, tokens=1, last_ns=77), 1: bucket(9, tokens=2, last_ns=88)})
    new = {key(n + 0): bucket(5), key(n + 1): bucket(10), key(n + 2): bucket(5)}
    out = keep_bucket_state(live, new, n)
    assert out[key(n + 0)] == bucket(5, tokens=1, last_ns=77)  # same bucket: state kept
    assert out[key(n + 1)] == bucket(10)  # configuration changed: starts full
    assert out[key(n + 2)] == bucket(5)  # no live bucket at that index


def test_generation_one_to_zero() -> None:
    n = 2
    live: Any = Table({n + 1: bucket(5, tokens=0, last_ns=5)})
    out = keep_bucket_state(live, {key(1): bucket(5)}, n)
    assert out[key(1)] == bucket(5, tokens=0, last_ns=5)
