"""Stopping the child processes tests start (Envoy, `l7fp serve`, agents), by pid."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None,
                 sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """Send `sig` to a live `proc`, wait up to `grace_s`, then SIGKILL and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
