"""One way to stop a background asyncio task: cancel it and wait until it has ended.

Used by every long-lived watcher of the control plane (debounce, file and Istio
sources, the relay) so a stop never leaves a task running behind the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None, *, ignore_errors: bool = False) -> None:
    """Cancel `task` (None: nothing to do) and wait for it; its cancellation is not an error.

    `ignore_errors`: also swallow any exception the task ended with (the relay's
    upstream session, whose failure was already logged where it happened).
    """
    if task is None:
        return
    task.cancel()
    swallowed: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
    if ignore_errors:
        swallowed += (Exception,)
    with contextlib.suppress(*swallowed):
        await task
