"""Push batching like istiod's: wait for `quiet` seconds without changes, at most `max_wait`.

Owned by xds_server.server. `trigger()` may be called any number of times;
the callback runs once per batch with the monotonic time of the batch's first
change (used for the convergence-time histogram).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from xds_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Debouncer:
    def __init__(
        self, callback: Callable[[float, int], Awaitable[None]], quiet: float = 0.1, max_wait: float = 10.0
    ) -> None:
        self._cb = callback
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: float | None = None
        self._last = 0.0
        self._count = 0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="l7fp-debounce")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def trigger(self) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = now
        self._last = now
        self._count += 1
        self._event.set()

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            while True:
                assert self._first is not None
                now = time.monotonic()
                deadline = min(self._last + self.quiet, self._first + self.max_wait)
                if now >= deadline:
                    break
                await asyncio.sleep(deadline - now)
            born, count = self._first, self._count
            self._first, self._count = None, 0
            self._event.clear()
            try:
                await self._cb(born, count)
            except Exception:  # a failed push must not stop later pushes
                log.exception("push failed")
