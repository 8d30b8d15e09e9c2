"""Where the control plane meets the fast path (contract in docs/contracts.md).

Owned by xds_server; the other side is implemented by the fastpath package.

* `load_splitter(mode)`: with `--fastpath on|auto`, returns
  `fastpath.split.split_snapshot` if importable. `on` makes a missing module
  an error; `auto` serves unsplit snapshots without it; `off` never splits.
* `start_agent(server, args)` / `stop_agent(handle)`: `l7fp serve` calls these
  on startup and shutdown. If `fastpath.agent` exists and has
  `start(server, args)` (sync or async, returning a handle), it is called;
  `stop(handle)` likewise. The agent subscribes to plans with
  `server.add_plan_listener(callback(node_id, plan))`, and says which nodes'
  rate limiters it owns with `server.set_limit_owner(pred)` (until then, and
  with no agent, every limiter stays in the residual: docs/contracts.md,
  "Limiter ownership").
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any as AnyT

log = logging.getLogger(__name__)

Splitter = Callable[[str, dict[str, list[AnyT]]], AnyT]


class FastpathUnavailable(RuntimeError):
    pass


def load_splitter(mode: str) -> Splitter | None:
    if mode == "off":
        return None
    try:
        mod = importlib.import_module("fastpath.split")
        fn = mod.split_snapshot
    except (ImportError, AttributeError) as exc:
        if mode == "on":
            raise FastpathUnavailable(f"--fastpath on: fastpath.split.split_snapshot unavailable: {exc}") from exc
        log.info("fast path split not available (%s); serving snapshots unsplit", exc)
        return None
    return fn  # type: ignore[no-any-return]


async def start_agent(server: AnyT, args: AnyT) -> AnyT:
    """Start fastpath.agent if present and the mode allows; returns its handle or None."""
    if getattr(args, "fastpath", "auto") == "off":
        return None
    try:
        agent = importlib.import_module("fastpath.agent")
    except ImportError:
        return None
    start = getattr(agent, "start", None)
    if start is None:
        return None
    try:
        handle = start(server, args)
        if inspect.isawaitable(handle):
            handle = await handle
    except RuntimeError as exc:  # e.g. `--fastpath on` without root: the agent says why
        raise SystemExit(f"l7fp serve: {exc}") from exc
    return (agent, handle)


async def stop_agent(token: AnyT) -> None:
    if not token:
        return
    agent, handle = token
    stop = getattr(agent, "stop", None)
    if stop is None:
        return
    try:
        out = stop(handle)
        if inspect.isawaitable(out):
            await out
    except Exception:  # shutdown must go on
        log.exception("fast path agent stop failed")
