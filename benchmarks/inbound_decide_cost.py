"""What the destination's inbound decision costs per request (owner: NAME=inbound).

Run (root): PYTHONPATH=. .venv/bin/python -m benchmarks.inbound_decide_cost [--pairs 15]

Times `bpf_src/test_decide.c` built with `-DL7FP_TD_AGAIN` under
BPF_PROG_TEST_RUN (the kernel's own clock, 20,000 runs per measurement) on
the plan of tests/kernel_decide/test_again.py (a client's outbound listener
plus the destination's inbound listener with RBAC and a header add, merged by
fastpath.inbound_merge): the outbound decision alone, then outbound + inbound
(l7fp_decide_again), alternating; prints the medians (ns per request).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=15, help="alternating measurements (default 15)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kernel_decide.decide_prog import DecideProgram
    from kernel_decide.test_again import DST, _plans

    from fastpath.inbound_merge import merge, merged_name
    from fastpath.synth import synthesize

    client, dest = _plans()
    sp = synthesize(merge(client, lambda ip: dest if ip == DST else None).plan)
    prog = DecideProgram.get((*sp.cflags, "-DL7FP_TD_AGAIN=1"))
    prog.load(sp)
    out_lid, in_lid = sp.listener_ids["198.19.0.9_9000"], sp.listener_ids[merged_name(DST, 9000)]
    req = b"GET /x HTTP/1.1\r\nHost: api\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
    times: dict[str, list[int]] = {"outbound": [], "outbound+inbound": []}
    for _ in range(args.pairs):
        for name, again in (("outbound", 0), ("outbound+inbound", in_lid + 1)):
            prog.run(req, listener=out_lid, again=again)
            times[name].append(prog.time_ns(req))
    print(json.dumps({k: {"median_ns": statistics.median(v), "min_ns": min(v)}
                      for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
