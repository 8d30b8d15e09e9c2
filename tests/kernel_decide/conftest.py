"""Fixtures of the kernel decision tests (K1): compiled test_decide.c programs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.env import require_kernel

from kernel_decide.decide_prog import DecideProgram


@pytest.fixture
def decide_prog() -> Callable[[tuple[str, ...]], DecideProgram]:
    """Returns DecideProgram.get (one compile per flag set per process)."""
    require_kernel()
    return DecideProgram.get
