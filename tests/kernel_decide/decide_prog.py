"""Runs l7fp_decide under BPF_PROG_TEST_RUN (bpf_src/test_decide.c).

Test support of tests/kernel_decide (K1). One compiled program per knob set in
a process: a BCC compile plus the verifier cost seconds on these shared cores.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
from pathlib import Path

from fastpath import bpf_callback
from fastpath import bpf_structs as bs
from fastpath.synth import SynthesizedProgram, cclass_table, decide_text

REPO = Path(__file__).resolve().parents[2]
TEST_C = REPO / "bpf_src" / "test_decide.c"
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64
_BPF_PROG_TEST_RUN = 10


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


def program_text() -> str:
    test = re.sub(r'^#include "l7fp_decide.h"\s*$', "", TEST_C.read_text(), flags=re.M)
    return decide_text() + "\n/* ---- test_decide.c ---- */\n" + test


class DecideProgram:
    """test_decide.c compiled for one knob set, with its maps."""

    _cache: dict[tuple[str, ...], DecideProgram] = {}

    @classmethod
    def get(cls, cflags: tuple[str, ...] = ()) -> DecideProgram:
        if cflags not in cls._cache:
            cls._cache[cflags] = cls(cflags)
        return cls._cache[cflags]

    def __init__(self, cflags: tuple[str, ...]) -> None:
        from bcc import BPF

        self.cflags = cflags
        self.bpf = BPF(text=program_text().encode(), cflags=list(cflags))
        self.fd = bpf_callback.load_func(self.bpf, "td_decide", BPF.SCHED_CLS).fd
        self._write("l7fp_cclass", {b"\0\0\0\0": cclass_table()})

    def _write(self, name: str, entries: dict[bytes, bytes]) -> None:
        t = self.bpf[name.encode()]
        for k, v in entries.items():
            t[t.Key.from_buffer_copy(k)] = t.Leaf.from_buffer_copy(v)

    def load(self, sp: SynthesizedProgram, gen: int = 0) -> None:
        """Replace the plan tables with `sp`'s (generation `gen`)."""
        for name, entries in sp.tables(gen).items():
            self.bpf[name.encode()].clear()
            self._write(name, entries)
        self.bpf[b"l7fp_rr"].clear()

    def time_ns(self, data: bytes, repeat: int = 20000) -> int:
        """Mean ns of one run over `data` (the kernel's own BPF_PROG_TEST_RUN
        timing), with the inputs of the last run() (call run() first)."""
        pkt = b"\0" * 14 + data
        buf = ctypes.create_string_buffer(pkt, len(pkt))
        out = ctypes.create_string_buffer(len(pkt) + 256)
        attr = _TestRunAttr(prog_fd=self.fd, data_size_in=len(pkt), data_size_out=len(out),
                            data_in=ctypes.addressof(buf), data_out=ctypes.addressof(out),
                            repeat=repeat)
        if _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return int(attr.duration)

    def run(self, data: bytes, listener: int = 0, rand: int = 0, rand2: int = 0,
            gen: int = 0, now_ns: int = 1, src: str | None = None, again: int = 0,
            rand3: int = 0) -> bs.Decision:
        """l7fp_decide over `data` (the request bytes); the decision it wrote.
        `src`: the client's IPv4 address (None: unknown to the kernel).
        `again` (programs built with -DL7FP_TD_AGAIN): listener id + 1 of a
        second decision after a FORWARD (l7fp_decide_again, the data path's
        inbound decision). `rand3`: LEAST_REQUEST's second draw."""
        t = self.bpf[b"td_in"]
        ip = int.from_bytes(socket.inet_aton(src), "little") if src else 0
        t[t.Key(0)] = t.Leaf.from_buffer_copy(bytes(bs.TdIn(rand, rand2, gen, listener, now_ns,
                                                               ip, again, rand3)))
        pkt = b"\0" * 14 + data
        buf = ctypes.create_string_buffer(pkt, len(pkt))
        out = ctypes.create_string_buffer(len(pkt) + 256)
        attr = _TestRunAttr(prog_fd=self.fd, data_size_in=len(pkt), data_size_out=len(out),
                            data_in=ctypes.addressof(buf), data_out=ctypes.addressof(out),
                            repeat=1)
        if _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        o = self.bpf[b"td_out"]
        return bs.Decision.from_buffer_copy(bytes(o[o.Key(0)]))
