"""Fixtures of the mesh tests: running meshes with unique names, leftover checks.

Every mesh a test starts is torn down by a finalizer, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import naming, plumbing, teardown
from mesh.runner import Mesh

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "compose" / "demo"


def unique_name(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"


def leftovers(name: str) -> list[str]:
    """Everything of mesh `name` still on the host (empty when all is gone)."""
    found = [f"netns {n}" for n in plumbing.netns_list() if n.startswith(naming.netns_name(name, ""))]
    found += [f"link {x}" for x in plumbing.links_with_alias_prefix(naming.link_alias(name, ""))]
    save = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    found += [f"rule {line}" for line in save.splitlines() if f"l7fp:{name}\"" in line
              or f"l7fp:{name} " in line]
    cg = plumbing.mesh_cgroup(name)
    if cg.exists():
        found.append(f"cgroup {cg}")
    if teardown.state_dir(name).exists():
        found.append(f"state {teardown.state_dir(name)}")
    if Path(f"/etc/netns/{naming.netns_name(name, '')}").parent.exists():
        found += [f"etc {p}" for p in Path("/etc/netns").glob(f"{naming.netns_name(name, '')}*")]
    marker = f"/l7fp/{name}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"\nState:\tZ" in (proc / "status").read_bytes():
                continue  # a zombie holds no resources; init reaps it
            if marker in (proc / "cgroup").read_bytes() or \
                    str(teardown.state_dir(name)).encode() in (proc / "cmdline").read_bytes():
                found.append(f"process {proc.name}")
        except OSError:
            continue
    return found


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
