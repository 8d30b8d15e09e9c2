"""Load a BCC program whose code passes a callback to `bpf_loop`.

BCC 0.26 compiles the callback but neither relocates the callback's address
(clang leaves ``r2 = 0 ll`` with an ELF relocation BCC ignores) nor emits the
BTF func_info the verifier demands for a program with callbacks ("missing btf
func_info"). `load_with_callback` does both: it appends the callback's code
(compiled by BCC as its own function, so it has its own section) to the main
function's, turns every unrelocated ``ld_imm64 rX, 0`` of the main function
into a BPF_PSEUDO_FUNC load of the callback, and loads the program with a
minimal BTF (two static functions ``int f(void)``) through the bpf syscall.

The callback must not take its state from its arguments (BCC rewrites the
arguments of every non-static function as kprobe registers): it reads and
writes a per-CPU map instead. Called by the kernel-decision loaders
(tests/kernel_decide/decide_prog.py, fastpath's data-path loader) when the
plan compiles `L7FP_F_DFA` in; owned by the decision engine (K1).
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any

_SYS_BPF = 321  # x86_64
_PROG_LOAD, _BTF_LOAD = 5, 18
_PSEUDO_FUNC = 4
_libc = ctypes.CDLL(None, use_errno=True)


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64),
                ("btf_size", ctypes.c_uint32), ("btf_log_size", ctypes.c_uint32),
                ("btf_log_level", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    fd = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def minimal_btf() -> bytes:
    """BTF with `int`, `int (void)` and two static FUNCs of that prototype (ids 3, 4)."""
    strings = b"\0int\0main\0cb\0"
    types = b"".join([
        struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32),  # 1: int
        struct.pack("<III", 0, 13 << 24, 1),  # 2: FUNC_PROTO int (void)
        struct.pack("<III", 5, 12 << 24, 2),  # 3: FUNC main, static
        struct.pack("<III", 10, 12 << 24, 2),  # 4: FUNC cb, static
    ])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def link_callback(main: bytes, cb: bytes) -> tuple[bytes, int]:
    """main + cb with every unrelocated ``ld_imm64 rX, 0`` of main pointing to cb.
    Returns the code and the number of loads patched."""
    ins = bytearray(main)
    n = len(ins) // 8
    patched = 0
    i = 0
    while i < n - 1:
        if ins[i * 8] == 0x18:  # ld_imm64: two slots
            if ins[i * 8 + 1] >> 4 == 0 and ins[i * 8 + 4:i * 8 + 8] == b"\0" * 4 \
                    and ins[i * 8 + 12:i * 8 + 16] == b"\0" * 4:
                ins[i * 8 + 1] = (_PSEUDO_FUNC << 4) | (ins[i * 8 + 1] & 0xF)
                struct.pack_into("<i", ins, i * 8 + 4, n - (i + 1))
                patched += 1
            i += 2
            continue
        i += 1
    return bytes(ins) + cb, patched


def _prog_load(bpf: Any, fn: str, cb: str, prog_type: int, log_level: int,
               log: Any) -> int:
    """BPF_PROG_LOAD of `fn` + `cb` with the minimal BTF's func_info (the one
    load both `load_with_callback` and `verifier_log` make); the verifier's
    log goes to `log` (a ctypes buffer) when `log_level` is set. Returns the fd."""
    code, _ = link_callback(bpf.dump_func(fn), bpf.dump_func(cb))
    btf = minimal_btf()
    btf_buf = ctypes.create_string_buffer(btf, len(btf))
    btf_fd = _bpf(_BTF_LOAD, _BtfLoadAttr(btf=ctypes.addressof(btf_buf), btf_size=len(btf)))
    try:
        finfo = struct.pack("<IIII", 0, 3, len(bpf.dump_func(fn)) // 8, 4)
        fi_buf = ctypes.create_string_buffer(finfo, len(finfo))
        code_buf = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(code) // 8,
                             insns=ctypes.addressof(code_buf), license=ctypes.addressof(lic),
                             log_level=log_level, log_size=len(log) if log_level else 0,
                             log_buf=ctypes.addressof(log) if log_level else 0,
                             prog_name=(fn.encode() if isinstance(fn, str) else fn)[:15],
                             prog_btf_fd=btf_fd, func_info_rec_size=8,
                             func_info=ctypes.addressof(fi_buf), func_info_cnt=2)
        return _bpf(_PROG_LOAD, attr)
    finally:
        os.close(btf_fd)


def load_with_callback(bpf: Any, fn: str, cb: str, prog_type: int, log_size: int = 1 << 22) -> Any:
    """Load BCC function `fn` of `bpf` with callback `cb` linked in; returns a
    bcc Function (registered in bpf.funcs, so BCC's attach calls and cleanup
    work on it). Raises RuntimeError with the verifier's last lines."""
    from bcc import BPF

    if not link_callback(bpf.dump_func(fn), b"")[1]:
        raise RuntimeError(f"{fn.decode() if isinstance(fn, bytes) else fn}: no callback load to link")
    log = ctypes.create_string_buffer(log_size)
    try:
        fd = _prog_load(bpf, fn, cb, prog_type, 0, log)
    except OSError:
        try:  # again with the log, only to say why
            fd = _prog_load(bpf, fn, cb, prog_type, 1, log)
        except OSError as e:
            tail = log.value.decode(errors="replace").splitlines()[-6:]
            raise RuntimeError(f"loading {fn!r} with callback {cb!r}: {e}: "
                               + " | ".join(tail)) from e
    name = fn.encode() if isinstance(fn, str) else fn
    func = BPF.Function(bpf, name, fd)
    bpf.funcs[name] = func
    return func


def verifier_log(bpf: Any, fn: str, cb: str, prog_type: int) -> str:
    """The verifier's log (level 4 stats) of loading `fn` with `cb` (benchmarks)."""
    log = ctypes.create_string_buffer(1 << 16)
    os.close(_prog_load(bpf, fn, cb, prog_type, 4, log))
    return log.value.decode(errors="replace")


DFA_CALLBACK = "l7fp_dfa_step"  # bpf_src/include/l7fp_dfa.h


def load_func(bpf: Any, fn: str, prog_type: int, cb: str = DFA_CALLBACK) -> Any:
    """`bpf.load_func(fn, prog_type)`, or `load_with_callback` when the module
    has the callback `cb` (the plan compiled L7FP_F_DFA in) and `fn` uses it."""
    try:
        bpf.dump_func(cb)
    except Exception:  # no such function: the plan has no DFA
        return bpf.load_func(fn, prog_type)
    if not link_callback(bpf.dump_func(fn), b"")[1]:
        return bpf.load_func(fn, prog_type)
    return load_with_callback(bpf, fn, cb, prog_type)
