"""Fixtures for the Istio importer and relay tests: `l7fp serve` processes, Envoys.

Everything started here is stopped by pid in teardown, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, pick_free_port
from tests.support.procs import stop_process
from xds_server.bootstrap import bootstrap_config
from xds_server.envoyproc import Envoy


class Serve:
    """`l7fp serve ARGS` as a child process on free ports."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log_path = args, log
        self.xds_port = pick_free_port()
        self.admin_port = pick_free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xds_server", "--log-level", "debug", "serve",
                 "--xds-address", "127.0.0.1", "--xds-port", str(self.xds_port),
                 "--admin-port", str(self.admin_port), "--debounce-ms", "20", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.admin_port}{path}") as r:
            return json.loads(await r.text())

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            try:
                async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.1:{self.admin_port}/healthz/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("l7fp serve not ready:\n" + self.log()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.stop()


def new_serve(serves: list[Serve], tmp_path: Path, args: list[str]) -> Serve:
    s = Serve(args, tmp_path / f"serve-{len(serves)}.log")
    serves.append(s)
    return s.start()


@pytest.fixture
def envoys() -> Iterator[list[Envoy]]:
    started: list[Envoy] = []
    yield started
    for e in started:
        e.stop()


def new_envoy(envoys: list[Envoy], envoy_bin: str, xds_port: int, node_id: str,
              metadata: dict[str, Any] | None = None) -> Envoy:
    admin = pick_free_port()
    boot = bootstrap_config(node_id, f"127.0.0.1:{xds_port}", admin_port=admin)
    if metadata:
        boot["node"]["metadata"] = metadata
    e = Envoy(boot, admin, binary=envoy_bin, log_level="info")
    envoys.append(e)
    return e.start()


async def wait_for(pred: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"{getattr(pred, '__name__', pred)} not met within {timeout}s")
