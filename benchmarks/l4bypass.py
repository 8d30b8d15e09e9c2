"""Loader of bpf_src/l4_bypass: the sockmap bypass of app<->sidecar hops (`sidecar-l4`).

Owned by the benchmark harness. `L4Bypass.attach(cgroups)` compiles the
program with BCC, attaches `sock_ops` to every given pod cgroup and the
`sk_msg` verdict to the SOCKHASH; `detach()` removes every attachment and
frees the maps (closing the map drops the sockets from it, so traffic goes
back to plain TCP). `stats()` reads the program's counters, so a run can show
that the bypass really carried the bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SRC_DIR = Path(__file__).resolve().parent.parent / "bpf_src" / "l4_bypass"
STAT_NAMES = ("redirected_msgs", "passed_msgs", "sockets_added", "ambiguous_endpoints")


class L4Bypass:
    """One loaded copy of the bypass; attach once, detach once (idempotent)."""

    def __init__(self) -> None:
        self.bpf: Any = None
        self.sockops_fn: Any = None
        self.skmsg_fn: Any = None
        self.map_fd: int = -1
        self.cgroup_fds: list[int] = []

    def load(self) -> None:
        from bcc import BPF  # heavy import, only where the bypass is used

        # BCC rewrites map calls and finds programs only in its main text, so
        # the files are concatenated (the header's guard makes the .c files'
        # own #include of it a no-op)
        text = "\n".join((SRC_DIR / f).read_text() for f in ("l4_bypass.h", "sock_ops.c", "sk_msg.c"))
        self.bpf = BPF(text=text, cflags=[f"-I{SRC_DIR}", "-Wno-unused-function"])
        self.sockops_fn = self.bpf.load_func("l4b_sockops", BPF.SOCK_OPS)
        self.skmsg_fn = self.bpf.load_func("l4b_skmsg", BPF.SK_MSG)
        from bcc.libbcc import lib

        # BCC 0.26 cannot wrap a SOCKHASH (table type 18): take its fd directly
        self.map_fd = lib.bpf_table_fd(self.bpf.module, b"l4b_socks")
        if self.map_fd < 0:
            raise RuntimeError("l4_bypass: no fd for SOCKHASH l4b_socks")

    def attach(self, cgroup_dirs: list[Path]) -> None:
        """Attach sk_msg to the map and sock_ops to each pod cgroup."""
        from bcc import BPF, BPFAttachType

        if self.bpf is None:
            self.load()
        BPF.attach_func(self.skmsg_fn, self.map_fd, BPFAttachType.SK_MSG_VERDICT)
        for d in cgroup_dirs:
            fd = os.open(d, os.O_RDONLY)
            try:
                BPF.attach_func(self.sockops_fn, fd, BPFAttachType.CGROUP_SOCK_OPS)
            except BaseException:
                os.close(fd)
                raise
            self.cgroup_fds.append(fd)

    def stats(self) -> dict[str, int]:
        if self.bpf is None:
            return dict.fromkeys(STAT_NAMES, 0)
        table = self.bpf["l4b_stats"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(STAT_NAMES)}

    def detach(self) -> None:
        """Remove every attachment and close the program (safe to call twice)."""
        if self.bpf is None:
            return
        from bcc import BPF, BPFAttachType

        for fd in self.cgroup_fds:
            try:
                BPF.detach_func(self.sockops_fn, fd, BPFAttachType.CGROUP_SOCK_OPS)
            except Exception:  # the cgroup may already be gone: nothing left attached
                pass
            os.close(fd)
        self.cgroup_fds.clear()
        try:
            BPF.detach_func(self.skmsg_fn, self.map_fd, BPFAttachType.SK_MSG_VERDICT)
        except Exception:
            pass
        self.bpf.cleanup()
        self.bpf = None
