"""What one pytest-xdist worker keeps to itself, so that the test file it runs
does not meet the one the other worker runs at the same time (`make test`:
`-n 2 --dist loadfile`). Called by tests/conftest.py's pytest_configure.

Ports: `xds_server.ports` picks a free port and its user binds it later (4.6 s
median, up to 42 s for an Envoy listener that comes over xDS: docs/test-harness.md);
until then the port is still free for the other worker's picks. Each worker gets its own slice
of `ports.port_range()` as `L7FP_PORT_RANGE`, which the processes it starts
(mesh daemons, `l7fp serve`) inherit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from xds_server import ports


def port_slice(low: int, high: int, index: int, count: int) -> tuple[int, int]:
    """Slice `index` of `count` equal slices of low..high (the last takes the rest)."""
    size = (high - low + 1) // count
    start = low + index * size
    return start, high if index == count - 1 else start + size - 1


def worker_port_range(env: Mapping[str, str] = os.environ) -> str | None:
    """`L7FP_PORT_RANGE` ("LO-HI") for the xdist worker `env` describes, None
    outside xdist (or with one worker)."""
    worker = env.get("PYTEST_XDIST_WORKER", "")
    count = int(env.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return None
    low, high = port_slice(*ports.port_range(), int(worker[2:]), count)
    return f"{low}-{high}"
