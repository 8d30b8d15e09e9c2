"""`l7fp serve --upstream-xds HOST:PORT` with nothing listening there said
nothing until a sidecar connected (the relay dials per sidecar): now one
TCP connect at startup, one warning line, and the result in /debug/relayz
and /metrics. Not an exit: istiod may come up later."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from xds_server import relay, serve
from xds_server.ports import pick_free_port


async def _relayz_and_metrics(upstream: str) -> tuple[list[dict[str, object]], str]:
    args = serve.options(upstream_xds=upstream, xds_port=0, admin_port=0, fastpath="off")
    async with serve.running(args) as run, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{run.admin_port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            async with http.get(f"{base}/debug/relayz") as resp:
                relayz = await resp.json()
            if relayz[0]["startup_probe"] is not None:
                break
            await asyncio.sleep(0.05)
        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
    return relayz, metrics


def test_nothing_listening_upstream_is_said_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    port = pick_free_port()  # nobody listens there
    with caplog.at_level(logging.INFO, logger="xds_server.relay"):
        relayz, metrics = asyncio.run(_relayz_and_metrics(f"127.0.0.1:{port}"))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [f"relay: upstream --upstream-xds 127.0.0.1:{port} does not answer: "
                    "Connection refused; serving anyway, each sidecar's upstream stream "
                    "retries with backoff"]
    probe = relayz[0]["startup_probe"]
    assert isinstance(probe, dict) and probe["ok"] is False and probe["error"] == "Connection refused"
    assert f'l7fp_relay_upstream_reachable{{upstream="127.0.0.1:{port}"}} 0.0' in metrics


def test_a_listening_upstream_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[list[dict[str, object]], str]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await _relayz_and_metrics(f"127.0.0.1:{port}")
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger="xds_server.relay"):
        relayz, metrics = asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    probe = relayz[0]["startup_probe"]
    assert isinstance(probe, dict) and probe["ok"] is True and probe["error"] == ""
    assert "l7fp_relay_upstream_reachable{" in metrics and '"} 1.0' in metrics


def test_the_probe_is_bounded() -> None:
    """The probe's own bound (2 s in serve): a connect not done in time is said so."""
    port = pick_free_port()
    assert asyncio.run(relay.probe("127.0.0.1", port, timeout=0)) == "no answer in 0s"
    assert asyncio.run(relay.probe("127.0.0.1", port)) == "Connection refused"
