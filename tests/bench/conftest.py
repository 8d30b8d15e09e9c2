"""Fixtures of the benchmark harness tests (tests/bench)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"benchmark app not listening on 127.0.0.1:{port}")


@pytest.fixture
def leaf_app(free_port: int) -> Iterator[str]:
    """The benchmark's real leaf app on loopback; yields its URL; stopped by pid."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.apps", "leaf", "--host",
                             "127.0.0.1", "--port", str(free_port), "--name", "t"], cwd=REPO)
    try:
        _wait_port(free_port)
        yield f"http://127.0.0.1:{free_port}/"
    finally:
        proc.terminate()
        proc.wait(10)
