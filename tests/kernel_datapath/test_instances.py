"""Two nodes with the same C text and cflags: one compile, two sets of maps.

`fastpath.loader.compile_module` compiles a (text, cflags) once and gives each
instance name its own maps and programs over that code
(`fastpath.bpf_instance`). What must hold, beyond the saved compile: no map is
shared, and every program of an instance reads and writes only its own maps
(the kernel's list of the maps each loaded program uses says so).
"""

from __future__ import annotations

import pytest

from fastpath import bpfsys
from fastpath.loader import Datapath

pytestmark = pytest.mark.kernel


def _map_ids(dp: Datapath) -> set[int]:
    return {bpfsys.map_info(fd).id for fd in dp.bpf.fds.values()}


def test_a_second_instance_shares_the_compile_not_the_maps(kernel: None) -> None:
    from fastpath.bpf_instance import table_fds

    # the built-in decision without cflags, as the `datapath` fixture: in a
    # whole run the compile is shared with the other tests of this directory
    a = Datapath.load(instance="startup-a")
    try:
        b = Datapath.load(instance="startup-b")
        try:
            assert "compile" not in b.timing and "load" in b.timing, b.timing
            mine, theirs = _map_ids(b), _map_ids(a)
            assert mine and not mine & theirs
            compiled = {bpfsys.map_info(fd).id for fd in table_fds(b.bpf.module).values()}
            for name, prog_fd in b.fds.items():
                if name.startswith("dp_"):
                    continue  # a map's fd, not a program's
                used = set(bpfsys.prog_map_ids(prog_fd))
                assert used and used <= mine, (name, used - mine)
                assert not used & compiled, name
            a.set_service("198.18.7.1", 80, 3)
            assert len(a.bpf["dp_svc"]) == 1 and len(b.bpf["dp_svc"]) == 0
        finally:
            b.unload()
    finally:
        a.unload()
