"""Helpers of the mesh tests (imported by conftest.py and the test modules).

A plain module, not a package: `tests/mesh` must not become a package named
`mesh`, which would shadow the real `mesh` package.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mesh import configdir, naming, plumbing, teardown
from mesh.runner import Mesh

PY = sys.executable
CLIENT = str(Path(__file__).with_name("podclient.py"))


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


def policy_switch(m: Mesh, client_pod: str, edit: tuple[str, str], seconds: float = 6.0,
                  ) -> tuple[list[dict], float]:
    """Edit the mesh's policy file while a client runs; (rows, time of the edit).

    Both writes go by rename (`configdir.atomic_write`): the daemon polls the
    file, and a read between `write_text`'s truncate and its write is an empty
    policy, which it applies (every pod's policy gone for a poll; seen as the
    eight 200s of test_local_rate_limit_at_inbound right after this restore)."""
    policy = Path(m.spec.path).with_name("policies.yaml")
    original = policy.read_text()
    assert edit[0] in original
    client = subprocess.Popen(
        ["ip", "netns", "exec", m.pod(client_pod)["netns"], PY, CLIENT, "user", "9000",
         "/user", "--seconds", str(seconds), "--rate", "200"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        changed_at = time.time()
        configdir.atomic_write(policy, original.replace(*edit))
        out, _ = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        configdir.atomic_write(policy, original)
    return [json.loads(line) for line in out.splitlines()], changed_at


def switch_delay(rows: list[dict], changed_at: float, old: str) -> float:
    """Seconds from the edit to the last response still served by `old`."""
    assert rows and all(r["status"] == 200 for r in rows), collections.Counter(
        (r["status"], r["by"]) for r in rows)
    assert any(r["by"] == old for r in rows if r["t"] < changed_at)
    last_old = max(r["t"] for r in rows if r["by"] == old)
    assert [r for r in rows if r["t"] > last_old], "the change never took effect"
    return last_old - changed_at
