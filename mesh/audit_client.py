"""The pod side of `l7fp mesh audit`: sends the requests it is given, one line at a time.

Started by `mesh.audit` inside a pod's network namespace and cgroup (so its
traffic is the pod's: intercepted by the sidecar, seen by the fast path).
Reads one JSON object per line on stdin, {"ip", "port", "method", "target",
"headers": [[name, value], ...], "timeout"}, sends exactly that request on a
new connection (no header added: http.client's Host and Accept-Encoding are
skipped, the Host line is in "headers"; no Connection header, which the kernel
would hand to Envoy), reads the response and prints one JSON line {"status",
"server", "error", "seconds"}. "timeout" bounds each socket operation and the
whole request (a response trickled byte by byte must not hold the audit):
past it the line's error is "Deadline: ...". Ends at EOF. At most
MAX_REQUESTS requests.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
from typing import Any

MAX_REQUESTS = 10_000


class Deadline(Exception):
    """The whole request took longer than its timeout."""


def send(job: dict[str, Any]) -> dict[str, Any]:
    """Send one job's request and read its response, within job["timeout"] s in all
    (main thread only: the deadline is a SIGALRM timer)."""
    t0 = time.monotonic()
    timeout = float(job["timeout"])

    def expired(_sig: int, _frame: object) -> None:
        raise Deadline(f"no complete answer within {timeout:g} s")
    old = signal.signal(signal.SIGALRM, expired)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return _exchange(job, timeout, t0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline as exc:  # also when it fires between _exchange's return and the reset
        return _failed(exc, t0)
    finally:
        signal.signal(signal.SIGALRM, old)


def _failed(exc: Exception, t0: float) -> dict[str, Any]:
    return {"status": 0, "server": None, "error": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.monotonic() - t0, 4)}


def _exchange(job: dict[str, Any], timeout: float, t0: float) -> dict[str, Any]:
    conn = http.client.HTTPConnection(job["ip"], int(job["port"]), timeout=timeout)
    try:
        conn.putrequest(job["method"], job["target"], skip_host=True, skip_accept_encoding=True)
        for name, value in job["headers"]:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        return {"status": r.status, "server": r.getheader("server"), "error": "",
                "seconds": round(time.monotonic() - t0, 4)}
    except Exception as exc:  # any job's failure (e.g. ValueError: a bad header) is its row's error
        return _failed(exc, t0)
    finally:
        conn.close()


def main() -> int:
    for n, line in enumerate(sys.stdin):
        if n >= MAX_REQUESTS:
            break
        print(json.dumps(send(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
