"""Free ports for the servers and Envoys L7FP starts next to itself.

Callers: `python -m xds_server.demo` (the admin port), the mesh daemon
(mesh/daemon.py: the control plane's ports on the mesh bridge), the benchmarks
(ads_scale, mirror_senders) and the test harness (tests/conftest.py,
tests/xds/helpers.py, tests/kernel_datapath/k2_envoy.py, tests/split/harness.py).
A port is picked *outside* the kernel's ephemeral
range: a port the kernel handed out by bind(0) can be taken by an outgoing
connection (ours, or another test's) before the process we start binds it, and
an Envoy whose listener cannot bind never routes (seen once in CI as a 10 s
wait for the first routed request in tests/xds/test_envoy_e2e.py).
"""

from __future__ import annotations

import random
import socket


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports bindable on ``host``, outside the ephemeral range."""
    lo, hi = _ephemeral()
    low, high = (20000, lo - 1) if lo > 21000 else (hi + 1, 65000)
    rng = random.Random()
    out: list[int] = []
    while len(out) < n:
        port = rng.randint(low, high)
        if port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        out.append(port)
    return out


def pick_free_port(host: str = "127.0.0.1") -> int:
    """One port bindable on ``host``, outside the ephemeral range."""
    return free_ports(1, host)[0]
