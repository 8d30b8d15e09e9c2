"""`l7fp serve`: run the ADS server (gRPC) and the admin API (HTTP) until SIGINT/SIGTERM.

Also the in-process entry for the demo and tests: `async with running(opts) as r:`
gives a started server with its bound ports (port 0 picks a free one).

Plugins: each module in SERVE_PLUGINS that exists may define
  add_serve_arguments(parser)           extra `l7fp serve` flags
  make_sources(args) -> list[Source]    more config sources (e.g. --policies DIR)
  setup(server, admin_app, args)        before serving; may return an (async) cleanup callable
  grpc_services(server, args) -> list   more grpclib servicers on the ADS port (e.g. ALS)
so other packages add their sources and pages without editing this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any as AnyT

log = logging.getLogger(__name__)

SERVE_PLUGINS: tuple[str, ...] = (
    "xds_server.istio.serve_plugin",
    "xds_server.relay",
    "fastpath.serve_plugin",
)

HELP = """\
Serve Envoy resources over ADS (gRPC, SotW and Delta) to Envoy proxies.

Config comes from --config DIR (Envoy resource files, hot-reloaded; format in
docs/contracts.md) and from the admin API's REST endpoints. Admin API:
/healthz/ready /metrics /debug/syncz /debug/config_dump?proxyID= /debug/adsz.
Start an Envoy against it with: l7fp bootstrap --node-id ID > b.yaml; envoy -c b.yaml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="run the xDS control plane", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    for plugin in plugins():
        fn = getattr(plugin, "add_serve_arguments", None)
        if fn:
            fn(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="DIR", help="directory of Envoy resource files (YAML/JSON)")
    p.add_argument("--xds-address", default="0.0.0.0", help="gRPC listen address (default 0.0.0.0)")
    p.add_argument("--xds-port", type=port, default=15010, help="gRPC ADS port (default 15010, as istiod)")
    p.add_argument("--admin-address", default="127.0.0.1", help="admin API address (default 127.0.0.1)")
    p.add_argument("--admin-port", type=port, default=15014, help="admin API port (default 15014)")
    p.add_argument("--debounce-ms", type=milliseconds, default=100, help="push after this quiet time (default 100)")
    p.add_argument("--debounce-max-ms", type=milliseconds, default=10000,
                   help="push at the latest after this (default 10000)")
    p.add_argument("--fastpath", choices=["on", "off", "auto"], default="auto",
                   help="split snapshots with fastpath.split (auto: if installed; default auto)")


def port(text: str) -> int:
    """argparse type of --xds-port/--admin-port: 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port number 0-65535")
    return value


def milliseconds(text: str) -> int:
    """argparse type of --debounce-ms/--debounce-max-ms: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of milliseconds >= 0")
    return int(text)


def _cannot_listen(flag: str, host: str, port: int, exc: OSError) -> SystemExit:
    """The exit for a port another process holds: name the flag the user can change."""
    why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's text repeats the address
    return SystemExit(f"l7fp serve: {flag} {port}: cannot listen on {host}:{port}: {why}")


def plugins() -> list[ModuleType]:
    out = []
    for name in SERVE_PLUGINS:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name and not name.startswith(exc.name) and exc.name != name:
                raise  # the plugin exists but one of its imports is missing: say so
    return out


@dataclass
class Running:
    """A started server: `server`, and the ports it actually bound."""

    server: AnyT
    xds_port: int
    admin_port: int
    cleanups: list[Callable[[], AnyT]] = field(default_factory=list)


def options(**kw: AnyT) -> argparse.Namespace:
    """Serve options with defaults, for in-process use (demo, tests)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    for plugin in plugins():  # their flags get their defaults too
        fn = getattr(plugin, "add_serve_arguments", None)
        if fn:
            fn(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@contextlib.asynccontextmanager
async def running(args: argparse.Namespace) -> AsyncIterator[Running]:
    """Start sources, ADS and admin API; stop everything on exit."""
    from aiohttp import web
    from grpclib.server import Server

    from xds_server import admin, fastpath_hook
    from xds_server.ads import AdsService, PassthroughCodec
    from xds_server.resources import ensure_registered
    from xds_server.server import XdsServer
    from xds_server.sources import rest
    from xds_server.sources.files import DirectorySource

    ensure_registered()
    sources: list[AnyT] = []
    if args.config:
        files = DirectorySource(args.config)
        if not files.load():
            raise SystemExit(f"l7fp serve: config in {args.config} does not load (see errors above)")
        sources.append(files)
    rest_source = rest.RestSource()
    sources.append(rest_source)
    mods = plugins()
    for plugin in mods:
        make = getattr(plugin, "make_sources", None)
        if make:
            sources.extend(make(args))
    server = XdsServer(
        sources, debounce=args.debounce_ms / 1000, debounce_max=args.debounce_max_ms / 1000,
        splitter=fastpath_hook.load_splitter(args.fastpath),
    )
    app = admin.build_admin(server)
    rest.mount(app, server, rest_source)
    run = Running(server, 0, 0)
    for plugin in mods:
        setup = getattr(plugin, "setup", None)
        if setup:
            cleanup = setup(server, app, args)
            if inspect.isawaitable(cleanup):
                cleanup = await cleanup
            if cleanup:
                run.cleanups.append(cleanup)
    extra = [svc for plugin in mods if hasattr(plugin, "grpc_services")
             for svc in plugin.grpc_services(server, args)]
    grpc = Server([AdsService(server), *extra], codec=PassthroughCodec())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    agent = None
    grpc_started = False
    try:
        await server.start()
        try:
            await grpc.start(args.xds_address, args.xds_port)
        except OSError as exc:
            raise _cannot_listen("--xds-port", args.xds_address, args.xds_port, exc) from exc
        grpc_started = True
        run.xds_port = grpc._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        site = web.TCPSite(runner, args.admin_address, args.admin_port)
        try:
            await site.start()
        except OSError as exc:
            raise _cannot_listen("--admin-port", args.admin_address, args.admin_port, exc) from exc
        run.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        agent = await fastpath_hook.start_agent(server, args)
        log.info("serving ADS on %s:%d, admin on http://%s:%d", args.xds_address, run.xds_port,
                 args.admin_address, run.admin_port)
        yield run
    finally:
        await fastpath_hook.stop_agent(agent)
        for cleanup in reversed(run.cleanups):
            out = cleanup()
            if inspect.isawaitable(out):
                await out
        if grpc_started:  # grpclib's close() raises on a server that never listened
            grpc.close()
        await server.stop()
        await runner.cleanup()
        if grpc_started:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(grpc.wait_closed(), 2)


async def serve_forever(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running(args):
            await stop.wait()
    except OSError as exc:
        log.error("l7fp serve: %s", exc)
        return 1
    log.info("shut down")
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve_forever(args))
