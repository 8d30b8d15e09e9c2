"""The sk_msg behaviour the data path's framing relies on, on this kernel
(minimal program: skmsg_repro.c). If a kernel changes one of these, the
framing of bpf_src/sk_msg.c must change with it: these fail first."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.kernel]


@pytest.fixture(scope="module")
def repro() -> Iterator[Any]:
    from support.env import require_kernel

    require_kernel()
    from skmsg_repro import Repro

    r = Repro()
    yield r
    r.close()


HEAD = [b"GET /a HT", b"TP/1.1\r\n\r\n"]


@pytest.mark.parametrize("mode", ["cork", "corkin"])
def test_cork_then_redirect_delivers_one_message(repro, mode):  # type: ignore[no-untyped-def]
    """cork_bytes holds a split head; the next write reruns the program on the
    whole head, and a redirect (egress, or ingress as in paired mode) takes it all."""
    out = repro.run(mode, [HEAD[0][:3], HEAD[0][3:], HEAD[1]], cork_to=19)
    peer = "B_target" if mode == "cork" else "T_ingress"
    assert out[peer] == "GET /a HTTP/1.1\r\n\r\n", out
    assert out["A_normal"] == "" and out["sent"] == [3, 6, 10]
    # the program ran on the first write and on the completed head only
    assert [r[0] for r in out["log"]] == [3, 19]


def test_pop_all_swallows_the_write(repro):  # type: ignore[no-untyped-def]
    out = repro.run("popall", [b"swallow-me", b"then-this"])
    assert out["sent"] == [10, 9]  # the writer sees its bytes sent
    assert out["A_normal"] == out["B_target"] == out["C_ingress"] == ""
    assert [r[3] for r in out["log"]] == [0, 0]


def test_reply_then_swallow_later_writes(repro):  # type: ignore[no-untyped-def]
    out = repro.run("replycut", [b"POST / HTTP/1.1\r\n\r\nbo", b"dy-rest", b"more"], reply_len=12)
    assert out["C_ingress"] == "R" * 12 and out["A_normal"] == "" and out["B_target"] == ""


def test_rest_after_apply_bytes_keeps_the_redirect(repro):  # type: ignore[no-untyped-def]
    """After apply_bytes + redirect the program runs again on the rest of the
    write, and a plain SK_PASS there follows the first redirect (why sk_msg.c
    points a rest run at the socket's own egress first)."""
    plain = repro.run("apply", [b"first|second"], apply=6)
    assert plain["B_target"] == "first|second" and plain["A_normal"] == ""
    fixed = repro.run("applyself", [b"first|second"], apply=6)
    assert fixed["B_target"] == "first|" and fixed["A_normal"] == "second"
    assert [r[0] for r in fixed["log"]] == [12, 6]
