"""Pure parts of the data-path agent (K2): no kernel needed."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fastpath import agent
from fastpath.agent_inline import envoy_reply
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
    assert envoy_reply(403, "x").startswith(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 1\r\n")
