"""The host side of `l7fp mesh audit`'s pod client: start it in a pod, ask it, bound the wait.

Used by mesh.audit (`send_probes`), which owns one PodClient per sending pod
and closes it. The client (mesh.audit_client) runs in the pod's netns and
cgroup and answers one JSON line per request; its own deadline ends a
request after `timeout` s. Here every answer is awaited at most
`timeout + SLACK_S` s (plus START_S for a new client's first request, its
start); past that (a stuck `ip netns exec`, a client that hangs) the client
is killed, the request's answer is an error ("no answer within ..."), and
the next request starts a new client.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from typing import Any

from mesh.runner import pod_popen, repo_pythonpath

SLACK_S = 2.0  # beyond the client's own deadline: the JSON line, a loaded machine
START_S = 5.0  # more for the first request of a new client: `ip netns exec`, Python's start


class AuditClientError(RuntimeError):
    """The pod client ended, or answered something that is not its JSON line; says which pod."""


class PodClient:
    """mesh.audit_client in one pod, started on first use; `close` stops it."""

    def __init__(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def ask(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The client's answer to `job` ({"status", "error", ...}), at most
        timeout + SLACK_S s away; past that {"status": 0, "error": "no answer ..."}."""
        slack = SLACK_S if self.proc is not None else SLACK_S + START_S
        proc = self.proc or self._start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({**job, "timeout": timeout}).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise AuditClientError(f"the audit client in pod {self.pod['name']} ended before "
                                   f"its request (exit {proc.poll()})") from None
        line = self._line(time.monotonic() + timeout + slack)
        if line is None:
            self.close(kill=True)  # the next job gets a new client
            return {"status": 0, "server": None, "seconds": timeout + slack,
                    "error": f"no answer within {timeout + slack:g} s (the pod client was "
                             f"stopped)"}
        return self._answer(line, job)

    def _answer(self, line: bytes, job: dict[str, Any]) -> dict[str, Any]:
        try:
            got = json.loads(line)
        except ValueError:
            got = None
        if not isinstance(got, dict) or not isinstance(got.get("status"), int) \
                or not isinstance(got.get("error"), str):
            raise AuditClientError(f"the audit client in pod {self.pod['name']} answered "
                                   f"{line[:200]!r} to {job}, not its JSON line")
        return got

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
        self.buf = b""
        try:
            self.proc = pod_popen(self.pod, [sys.executable, "-m", "mesh.audit_client"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except (OSError, subprocess.SubprocessError) as exc:  # no `ip`, cgroup gone, not root
            raise AuditClientError(f"cannot start the audit client in pod {self.pod['name']} "
                                   f"(netns {self.pod['netns']}, cgroup {self.pod['cgroup']}): "
                                   f"{exc}") from None
        return self.proc

    def _line(self, deadline: float) -> bytes | None:
        """The client's next line, None when none came by `deadline`; AuditClientError at EOF."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AuditClientError(f"the audit client in pod {self.pod['name']} ended "
                                           f"before answering (exit {self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def close(self, kill: bool = False) -> None:
        """Stop the client: EOF first (it ends by itself), killed when it does not
        (at once with `kill`: it is stuck)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:  # it is gone already: a broken pipe
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
