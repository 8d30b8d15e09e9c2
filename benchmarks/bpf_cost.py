"""What the data path's BPF programs cost per run, measured by the kernel.

Usage: `python -m benchmarks.bpf_cost [--prefix dp_] -- COMMAND ...`

Runs COMMAND (for example `python -m benchmarks --scenario policy-mix-11
--quick`) while holding a BPF_ENABLE_STATS(RUN_TIME) fd, so the kernel counts
run time and runs of every BPF program for that long (its cost is two clock
reads per program run, on every program of the machine, only while COMMAND
runs). The programs whose name starts with the prefix are read every 0.5 s
(the data path's programs go with their mesh, so the last half second before
a teardown can be missed). Prints one line per program name: runs, total
time, ns per run (a tail call's work counts in its caller's run). Owner:
envoyreturn (figures in docs/fastpath.md).
"""

from __future__ import annotations

import argparse
import ctypes as ct
import subprocess
import sys
import time

from fastpath import bpfsys

BPF_STATS_RUN_TIME = 0
INFO_SIZE = 256  # enough of struct bpf_prog_info for name and the run counters
OFF_NAME, OFF_RUN_NS, OFF_RUN_CNT = 64, 192, 200  # uapi/linux/bpf.h offsets


def _lib() -> ct.CDLL:
    lib = bpfsys.lib()
    lib.bpf_enable_stats.argtypes = [ct.c_int]
    lib.bpf_prog_get_next_id.argtypes = [ct.c_uint32, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    return lib  # type: ignore[no-any-return]


def read_programs(prefix: str) -> dict[int, tuple[str, int, int]]:
    """prog id -> (name, run_time_ns, run_cnt) of the loaded programs named prefix*."""
    import os

    lib = _lib()
    out: dict[int, tuple[str, int, int]] = {}
    pid = ct.c_uint32(0)
    while lib.bpf_prog_get_next_id(pid.value, ct.byref(pid)) == 0:
        fd = lib.bpf_prog_get_fd_by_id(pid.value)
        if fd < 0:
            continue
        try:
            buf = ct.create_string_buffer(INFO_SIZE)
            n = ct.c_uint32(INFO_SIZE)
            if lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)) != 0:
                continue
            raw = buf.raw
            name = raw[OFF_NAME:OFF_NAME + 16].split(b"\0")[0].decode()
            if name.startswith(prefix):
                out[pid.value] = (name, int.from_bytes(raw[OFF_RUN_NS:OFF_RUN_NS + 8], "little"),
                                  int.from_bytes(raw[OFF_RUN_CNT:OFF_RUN_CNT + 8], "little"))
        finally:
            os.close(fd)
    return out


def summarize(seen: dict[int, tuple[str, int, int]]) -> list[str]:
    by_name: dict[str, list[int]] = {}
    for name, ns, cnt in seen.values():
        acc = by_name.setdefault(name, [0, 0])
        acc[0] += ns
        acc[1] += cnt
    lines = []
    for name, (ns, cnt) in sorted(by_name.items()):
        per = f"{ns / cnt:,.0f}" if cnt else "-"
        lines.append(f"{name:16} runs {cnt:>12,}  total {ns / 1e6:>10,.1f} ms  ns/run {per:>8}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="dp_", help="program name prefix (default dp_)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("a COMMAND to run is needed (after --)")
    stats_fd = _lib().bpf_enable_stats(BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        sys.exit(f"BPF_ENABLE_STATS refused ({stats_fd}): root needed")
    import os

    seen: dict[int, tuple[str, int, int]] = {}
    try:
        proc = subprocess.Popen(cmd)
        while proc.poll() is None:
            seen.update(read_programs(args.prefix))  # programs die with their mesh
            time.sleep(0.5)
        seen.update(read_programs(args.prefix))
    finally:
        os.close(stats_fd)
    print("\n".join(summarize(seen)))
    return proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
