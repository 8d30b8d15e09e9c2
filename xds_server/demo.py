"""`python -m xds_server.demo`: one control plane, one real Envoy (`l7fp demo` is the mesh demo).

Starts `l7fp serve` in-process on the bundled example config (examples/basic),
local upstreams for its clusters, and one Envoy child from `l7fp bootstrap`;
sends requests through Envoy, prints per route the requests and status codes,
and shuts everything down (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import socket
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from xds_server.ports import pick_free_port

log = logging.getLogger(__name__)
PROG = "python -m xds_server.demo"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "basic"
LISTENER = ("127.0.0.1", 18000)
UPSTREAMS = {"api": ("127.0.0.1", 18081), "web": ("127.0.0.1", 18082)}
PATHS = ["/", "/index.html", "/api/users", "/api/orders", "/admin/settings", "/healthz"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(EXAMPLE), help="config directory (default: examples/basic)")
    p.add_argument("--requests", type=_requests, default=10, help="requests per path, 1-10000 (default 10)")
    p.add_argument("--delta", action="store_true", help="Envoy uses incremental xDS")


def _requests(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number 1-10000")
    return int(text)


def _free(port_addr: tuple[str, int]) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(port_addr)
        except OSError:
            return False
    return True


async def start_upstreams() -> list[web.AppRunner]:
    """One tiny HTTP app per example cluster; each answers with its own name."""
    runners = []
    for name, (host, port) in UPSTREAMS.items():
        async def handle(request: web.Request, name: str = name) -> web.Response:
            return web.Response(text=f"{name} says hello to {request.path}\n")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    return runners


async def wait_listener(timeout: float = 20.0) -> None:
    url = f"http://{LISTENER[0]}:{LISTENER[1]}/healthz"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"Envoy listener {LISTENER[0]}:{LISTENER[1]} did not come up in {timeout}s")


async def send(n: int) -> dict[str, collections.Counter[str]]:
    """n requests per path through Envoy; {route: Counter(status)} from x-l7fp-route."""
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            for path in PATHS:
                url = f"http://{LISTENER[0]}:{LISTENER[1]}{path}"
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    await r.read()
                    table[r.headers.get("x-l7fp-route", "(no route)")][str(r.status)] += 1
    return table


def render(table: dict[str, collections.Counter[str]]) -> str:
    lines = [f"{'route':<14} {'requests':>8}  status codes", f"{'-' * 14} {'-' * 8}  {'-' * 20}"]
    for route in sorted(table):
        c = table[route]
        codes = ", ".join(f"{k}x{v}" for k, v in sorted(c.items()))
        lines.append(f"{route:<14} {sum(c.values()):>8}  {codes}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    from xds_server.bootstrap import bootstrap_config
    from xds_server.envoyproc import Envoy
    from xds_server.serve import options, running

    busy = [a for a in [LISTENER, *UPSTREAMS.values()] if not _free(a)]
    if busy:
        print(f"{PROG}: ports in use: {', '.join(f'{h}:{p}' for h, p in busy)}; stop what uses them",
              file=sys.stderr)
        return 1
    upstreams = await start_upstreams()
    envoy = None
    try:
        async with running(options(config=args.config, xds_address="127.0.0.1", xds_port=0,
                                   admin_port=0)) as srv:
            print(f"control plane: ADS on 127.0.0.1:{srv.xds_port}, admin http://127.0.0.1:{srv.admin_port}")
            admin_port = pick_free_port()
            node = "sidecar~127.0.0.1~demo-0.default~default.svc.cluster.local"
            boot = bootstrap_config(node, f"127.0.0.1:{srv.xds_port}", delta=args.delta, admin_port=admin_port)
            envoy = Envoy(boot, admin_port).start()
            await envoy.wait_ready()
            await wait_listener()
            print(f"envoy (pid {envoy.proc.pid if envoy.proc else '?'}, {'delta' if args.delta else 'sotw'} xDS)"
                  f" got its config; listener http://{LISTENER[0]}:{LISTENER[1]}")
            table = await send(args.requests)
            print(f"\n{args.requests} requests to each of {', '.join(PATHS)} through Envoy:\n")
            print(render(table))
            acked = sum(st.acks for c in srv.server.connections.values() for st in c.state.types.values())
            print(f"\nxDS: {len(srv.server.connections)} proxy connected, {acked} responses ACKed")
    finally:
        if envoy is not None:
            envoy.stop()
        for r in upstreams:
            await r.cleanup()
    print("demo done: envoy, upstreams and control plane stopped")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except RuntimeError as exc:
        print(f"{PROG} failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
