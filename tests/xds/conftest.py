"""Fixtures for control-plane tests: config dirs, local upstreams, `l7fp serve` and Envoy processes.

Everything started here is stopped by pid in the fixture's teardown, also when
the test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.support.procs import stop_process
from xds_server.bootstrap import bootstrap_config
from xds_server.envoyproc import Envoy

from .helpers import free_port as pick_free_port

REPO = Path(__file__).resolve().parents[2]


class ConfigDir:
    """A config directory the test edits; writes are atomic (rename) like a real deploy."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, name: str, resources: list[dict[str, Any]], **top: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump({**top, "resources": resources}, sort_keys=False))
        os.replace(tmp, self.path / name)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    def remove(self, name: str) -> None:
        (self.path / name).unlink()


@pytest.fixture
def config_dir(tmp_path: Path) -> ConfigDir:
    d = tmp_path / "config"
    d.mkdir()
    return ConfigDir(d)


class ServeProcess:
    """`l7fp serve` as a child process on fixed free ports (so it can be killed and restarted)."""

    def __init__(self, config: Path, log_dir: Path) -> None:
        self.config = config
        self.xds_port = pick_free_port()
        self.admin_port = pick_free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"serve-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xds_server", "--log-level", "debug", "serve", "--config", str(self.config),
             "--xds-address", "127.0.0.1", "--xds-port", str(self.xds_port),
             "--admin-port", str(self.admin_port), "--debounce-ms", "20"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("serve-*.log")))

    async def wait_ready(self, timeout: float = 120) -> None:
        """Until /healthz/ready answers 200. The child spends ~1.1 s of CPU
        before it listens (mostly imports: the Envoy API modules, aiohttp): 3.6-15 s
        wall at a load average of 9-11 on 2 cores, more than 20 s (the old
        bound) in 2 of 13 runs of test_cilium_envoy.py with four busy loops
        added, once 58 s. A child that exits fails at once; only one that
        never listens waits the whole bound."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            try:
                async with aiohttp.ClientSession() as s, s.get(self.admin + "/healthz/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("l7fp serve not ready:\n" + self.log()[-3000:])

    async def get_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.admin + path) as r:
            return json.loads(await r.text())

    async def get_text(self, path: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.admin + path) as r:
            return await r.text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def serve(config_dir: ConfigDir, tmp_path: Path) -> Iterator[ServeProcess]:
    p = ServeProcess(config_dir.path, tmp_path)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def envoys(envoy_bin: str) -> Iterator[list[Envoy]]:
    """A list the test appends started Envoys to; all are stopped by pid afterwards."""
    started: list[Envoy] = []
    yield started
    for e in started:
        e.stop()


def start_envoy(envoys: list[Envoy], envoy_bin: str, xds_port: int, node_id: str, delta: bool) -> Envoy:
    admin = pick_free_port()
    e = Envoy(bootstrap_config(node_id, f"127.0.0.1:{xds_port}", delta=delta, admin_port=admin),
              admin, binary=envoy_bin, log_level="info")
    envoys.append(e)
    return e.start()


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, int]]:
    """Two local HTTP apps, `one` and `two`; each answers with its own name."""
    runners, ports = [], {}
    for name in ("one", "two"):
        async def handle(request: web.Request, name: str = name) -> web.Response:
            return web.Response(text=name)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = pick_free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports[name] = port
    yield ports
    for r in runners:
        await r.cleanup()


async def http_get(port: int, path: str, timeout: float = 3) -> tuple[int, str, str]:
    """(status, body, x-route header) of one request through Envoy; (0, error, '') on failure."""
    try:
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            return r.status, await r.text(), r.headers.get("x-route", "")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return 0, repr(exc), ""


async def wait_for(pred: Any, timeout: float, step: float = 0.05) -> float:
    """Await `pred()` (async, truthy) until true; returns seconds taken; AssertionError on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await pred():
            return time.monotonic() - t0
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")
