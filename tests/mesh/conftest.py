"""Fixtures of the mesh tests: running meshes with unique names, leftover checks.

Every mesh a test starts is torn down by a finalizer, also when the test fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtest_util import unique_name

from mesh.runner import Mesh

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "compose" / "demo"


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """compose/demo copied, so a test can edit its policy file."""
    dst = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(DEMO_DIR, dst)
    return dst


@pytest.fixture(scope="module")
def demo_mesh(demo_copy: Path) -> Iterator[Mesh]:
    from support.env import require_kernel
    require_kernel()
    m = Mesh(demo_copy / "mesh.yaml", unique_name("d"), timeout=120)
    try:
        m.up()
        yield m
    finally:
        m.down()
