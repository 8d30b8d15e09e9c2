"""Cost of one observation counted by the agent (fastpath.agent_outlier):
one dp_od_ops run (BPF_PROG_TEST_RUN) per batch of OP_STATUS ops.

Run as root: `python -m benchmarks.od_ops_cost` prints µs per observation
for batches of 1 and of DP_OD_BATCH (docs/fastpath.md "Outlier detection").
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastpath import loader
from fastpath.agent_outlier import DP_OD_BATCH, OP_STATUS, OdOp, OutlierKeeper
from fastpath.outlier import OutlierConfig
from fastpath.plan import Cluster, Endpoint, KernelPlan, LbPolicy

N = 20_000  # observations per figure (bounded)


def main() -> None:
    bpf = loader.compile_module(loader.module_text(), ("-DDP_OUTLIER=1",), instance="od-ops-cost")
    k = OutlierKeeper(SimpleNamespace(bpf=bpf))
    c = Cluster("c", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.2", 80),),
                outlier=OutlierConfig(threshold_5xx=5))
    k.program(KernelPlan("n", "1", (), (c,)), SimpleNamespace(cluster_ids={"c": 0}, no_healthy={}),
              0, lambda cl: list(cl.endpoints), {})
    for batch in (1, DP_OD_BATCH):
        ops = [OdOp(OP_STATUS, 0, 0, 0, 200)] * batch
        t0 = time.perf_counter()
        for _ in range(N // batch):
            k._run_ops(ops)
        us = (time.perf_counter() - t0) / (N // batch * batch) * 1e6
        print(f"batch {batch:3d}: {us:.2f} us per observation")


if __name__ == "__main__":
    main()
