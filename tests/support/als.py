"""Helpers of the tests that run a real Envoy against fastpath.als.AccessLogService
(tests/xds/test_als.py, tests/kernel_differential/test_outlier_split_envoy.py).
Each test owns its Envoy, its upstream apps and its gRPC server; these only
end them in order."""

from __future__ import annotations

from aiohttp import web
from grpclib.server import Server

from xds_server.envoyproc import Envoy


async def true(v: bool) -> bool:
    """`v` as the coroutine tests/xds/conftest.wait_for awaits:
    `await wait_for(lambda: true(bool(got)), 10)`."""
    return v


async def stop_all(envoy: Envoy, server: Server, *runners: web.AppRunner) -> None:
    """Envoy first (its access-log stream ends), then the upstream apps, then
    the access-log server."""
    envoy.stop()
    for r in runners:
        await r.cleanup()
    server.close()
    await server.wait_closed()
