"""Verifier cost of the sk_msg programs of the l7fp data path, per compile knob.

    sudo PYTHONPATH=. .venv/bin/python -m benchmarks.verifier_cost [KNOB=VALUE ...]

Compiles the data path with the cflags of a small plan (tests' parser plan)
overridden by KNOB=VALUE (e.g. L7FP_MAX_STR=64 DP_RETRY=1 DP_INBOUND=1) and
loads the request programs (dp_msg_verdict, dp_msg_in, dp_msg_act, dp_msg_rw,
dp_msg_rwin) and the two response programs dp_srv_verdict (sk_msg) and
dp_skb_verdict (sk_skb) with the verifier's statistics (BPF_LOG_STATS).
Prints per program: instructions, load time, stack depth and instructions processed (limit 1,000,000). Nothing is attached. docs/fastpath.md
"Compile check and the two sk_msg programs" has figures from it.
"""

from __future__ import annotations

import ctypes as ct
import sys
import time

# (name, program type): dp_msg_rw only with DP_REWRITE=1, dp_msg_rwin with DP_INBOUND=1 too
PROGRAMS = ((b"dp_msg_verdict", "SK_MSG"), (b"dp_msg_in", "SK_MSG"), (b"dp_msg_act", "SK_MSG"),
            (b"dp_msg_rw", "SK_MSG"), (b"dp_msg_rwin", "SK_MSG"), (b"dp_srv_verdict", "SK_MSG"),
            (b"dp_skb_verdict", "SK_SKB"))
LOG_STATS = 4


def cflags(overrides: dict[str, str]) -> tuple[str, ...]:
    from fastpath import plan as P
    from fastpath.synth import synthesize

    vh = P.VirtualHost("web", ("web",), routes=(P.Route(
        "r", P.RouteMatch(P.PathKind.PREFIX, "/"),
        P.ClusterAction((P.WeightedCluster("c1", 1),)), P.Verdict.KERNEL),))
    lp = P.ListenerPlan("out", "0.0.0.0", 80, P.Direction.OUTBOUND, virtual_hosts=(vh,))
    c1 = P.Cluster("c1", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.2", 80),))
    knobs = dict(c[2:].split("=", 1) for c in
                 synthesize(P.KernelPlan("n", "1", listeners=(lp,), clusters=(c1,))).cflags)
    knobs.update(overrides)
    return tuple(f"-D{k}={v}" for k, v in knobs.items())


def measure(overrides: dict[str, str]) -> list[str]:
    from bcc import BPF, libbcc

    from fastpath import loader

    t = time.monotonic()
    b = loader.compile_module(loader.module_text("dp_decide_l7fp.h"), cflags(overrides),
                              instance="verifier_cost")
    out = [f"compile {time.monotonic() - t:.1f} s"]
    lib = libbcc.lib
    for name, kind in PROGRAMS:
        if not lib.bpf_function_start(b.module, name):
            continue  # not compiled in (dp_msg_rw without DP_REWRITE=1)
        if _uses_callback(b, name):  # L7FP_F_DFA: loaded with its bpf_loop callback
            out.append(_measure_with_callback(b, name))
            continue
        size = lib.bpf_function_size(b.module, name)
        buf = ct.create_string_buffer(1 << 20)
        t = time.monotonic()
        fd = lib.bcc_func_load(b.module, getattr(BPF, kind), name, lib.bpf_function_start(b.module, name),
                               size, lib.bpf_module_license(b.module),
                               lib.bpf_module_kern_version(b.module), LOG_STATS, buf, 1 << 20,
                               None, -1)
        dt = time.monotonic() - t
        stats = [ln for ln in buf.value.decode(errors="replace").splitlines()
                 if ln.startswith(("processed", "stack depth", "BPF program is too large"))]
        out.append(f"{name.decode()}: {size // 8} insns, load {dt:.1f} s, "
                   f"{'loaded' if fd >= 0 else 'REFUSED'}; " + "; ".join(stats))
    return out


def _uses_callback(b: object, name: bytes) -> bool:
    from fastpath import bpf_callback

    try:
        b.dump_func(bpf_callback.DFA_CALLBACK)  # type: ignore[attr-defined]
    except Exception:
        return False
    return bpf_callback.link_callback(b.dump_func(name), b"")[1] > 0  # type: ignore[attr-defined]


def _measure_with_callback(b: object, name: bytes) -> str:
    from bcc import BPF

    from fastpath import bpf_callback

    t = time.monotonic()
    try:
        log = bpf_callback.verifier_log(b, name.decode(), bpf_callback.DFA_CALLBACK, BPF.SK_MSG)
    except OSError as e:
        return f"{name.decode()}: REFUSED with the DFA callback ({e})"
    stats = [ln for ln in log.splitlines() if ln.startswith(("processed", "stack depth"))]
    size = len(b.dump_func(name)) // 8  # type: ignore[attr-defined]
    return (f"{name.decode()}: {size} insns + DFA callback, load {time.monotonic() - t:.1f} s, "
            "loaded; " + "; ".join(stats))


def main(argv: list[str]) -> int:
    try:
        overrides = dict(a.split("=", 1) for a in argv)
    except ValueError:
        print(f"arguments are KNOB=VALUE, got {argv}", file=sys.stderr)
        return 2
    for line in measure(overrides):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
