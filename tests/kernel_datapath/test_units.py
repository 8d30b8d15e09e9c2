"""Pure parts of the data-path agent (K2): no kernel needed."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fastpath import agent
from fastpath.counters import reason_name
from fastpath.loader import fnv1a


def test_auto_without_kernel_is_one_log_line(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(agent, "kernel_ready", lambda: "not root")
    server = SimpleNamespace(add_plan_listener=lambda cb: pytest.fail("subscribed"))
    with caplog.at_level(logging.INFO, logger="fastpath.agent"):
        assert agent.start(server, SimpleNamespace(fastpath="auto")) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fast path off: not root (Envoy serves every request)"]


def test_on_without_kernel_is_an_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(agent, "kernel_ready", lambda: "not root")
    with pytest.raises(RuntimeError, match="--fastpath on: .*not root"):
        agent.start(SimpleNamespace(), SimpleNamespace(fastpath="on"))


def test_reason_names_and_hash() -> None:
    assert reason_name(2) == "pool_empty"
    assert reason_name(32 + 7) == "punt_route"
    assert fnv1a(b"") == 0xCBF29CE484222325
    assert fnv1a(b"a") == 0xAF63DC4C8601EC8C  # published FNV-1a 64 test vector


def test_response_parser_hashes() -> None:
    """The header-name hashes compiled into bpf_src/dp_return.h (FNV-1a 32 of
    the bytes | 0x20, as dp_rsp_byte computes them)."""
    import re
    from pathlib import Path

    src = (Path(__file__).parents[2] / "bpf_src" / "dp_return.h").read_text()

    def h(s: str) -> int:
        x = 0x811C9DC5
        for c in s.encode():
            x = ((x ^ (c | 0x20)) * 0x01000193) & 0xFFFFFFFF
        return x

    for name, text in (("CONTENT_LENGTH", "Content-Length"), ("TRANSFER_ENCODING",
                                                              "Transfer-Encoding"),
                       ("CHUNKED", "chunked")):
        m = re.search(rf"#define DP_H_{name} (0x[0-9a-f]+)u", src)
        assert m and int(m.group(1), 16) == h(text), name
    assert reason_name(24) == "envoy_pending" and reason_name(25) == "envoy_untracked"
