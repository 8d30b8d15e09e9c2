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

A picked port is free when picked, not reserved: its user binds it later (an
Envoy listener up to seconds later), and a pick in between gets it again; the
later bind fails, or an Envoy listener (SO_REUSEPORT) shares it. So a process
does not hand out a port it handed out among its last RECENT picks, and
`L7FP_PORT_RANGE=LO-HI` keeps a process's picks to a range of its own: the
test suite gives each pytest-xdist worker a disjoint slice (tests/conftest.py),
so two test files running at once never pick the same port.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import threading

RANGE_ENV = "L7FP_PORT_RANGE"
RECENT = 128
_recent: collections.deque[int] = collections.deque(maxlen=RECENT)
_lock = threading.Lock()


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def port_range() -> tuple[int, int]:
    """(low, high), both included, where `free_ports` picks: `L7FP_PORT_RANGE`
    ("LO-HI") when set, else below the ephemeral range (above it when it starts
    low). ValueError names the variable when its value is no such range."""
    spec = os.environ.get(RANGE_ENV, "").strip()
    if spec:
        low_s, sep, high_s = spec.partition("-")
        try:
            low, high = int(low_s), int(high_s)
        except ValueError:
            low = high = 0
        if not sep or not 1 <= low <= high <= 65535:
            raise ValueError(f"{RANGE_ENV}={spec!r}: expected LO-HI, 1 <= LO <= HI <= 65535")
        return low, high
    lo, hi = _ephemeral()
    return (20000, lo - 1) if lo > 21000 else (hi + 1, 65000)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports bindable on ``host``, from `port_range()`, none of
    this process's last RECENT picks (unless the range is too small to spare them)."""
    low, high = port_range()
    size = high - low + 1
    if n > size:
        raise ValueError(f"{n} ports asked, {low}-{high} has {size}")
    rng = random.Random()
    with _lock:
        avoid = set(_recent) if size > 4 * RECENT + n else set()
        out: list[int] = []
        while len(out) < n:
            port = rng.randint(low, high)
            if port in out or port in avoid:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            out.append(port)
        _recent.extend(out)
    return out


def pick_free_port(host: str = "127.0.0.1") -> int:
    """One port bindable on ``host``, from `port_range()`."""
    return free_ports(1, host)[0]
