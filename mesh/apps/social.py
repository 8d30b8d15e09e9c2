"""Demo app: one aiohttp service of the social-network demo, role set by flags.

Started by the mesh daemon inside a pod (compose/demo/mesh.yaml), in the
spirit of DeathStarBench's social network: `--route PATH=URL[,URL...]` makes
PATH fan out to those URLs concurrently (service names resolve through the
pod's /etc/netns hosts file, the sidecar intercepts the calls) and answer
with a JSON summary; any other path is answered locally, like a leaf.
Every response carries `x-l7fp-service` and `x-l7fp-pod` headers so tests and
the demo can tell which version served it (canary split).

    python -m mesh.apps.social --port 9000 --route /home=http://user:9000/user
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


def parse_routes(items: list[str]) -> dict[str, list[str]]:
    """`/path=url1,url2` items to {path: [urls]}; a clear error names a bad item."""
    routes: dict[str, list[str]] = {}
    for item in items:
        path, sep, urls = item.partition("=")
        if not sep or not path.startswith("/") or not urls:
            raise SystemExit(f"--route {item!r}: expected /PATH=URL[,URL...]")
        routes[path] = [u for u in urls.split(",") if u]
    return routes


class App:
    """Holds the client session (keep-alive to the sidecar) and the fan-out table."""

    def __init__(self, service: str, routes: dict[str, list[str]], work_us: int) -> None:
        self.service = service
        self.pod = os.environ.get("POD_NAME", service)
        self.routes = routes
        self.work_us = work_us
        self.session: ClientSession | None = None

    def headers(self) -> dict[str, str]:
        return {"x-l7fp-service": self.service, "x-l7fp-pod": self.pod}

    async def start(self, _app: web.Application) -> None:
        self.session = ClientSession(connector=TCPConnector(limit=256),
                                     timeout=ClientTimeout(total=5))

    async def stop(self, _app: web.Application) -> None:
        if self.session:
            await self.session.close()

    async def call(self, url: str, fwd: dict[str, str]) -> dict[str, object]:
        assert self.session is not None
        t0 = time.perf_counter()
        try:
            async with self.session.get(url, headers=fwd) as r:
                await r.read()
                return {"url": url, "status": r.status, "by": r.headers.get("x-l7fp-service"),
                        "ms": round((time.perf_counter() - t0) * 1000, 2)}
        except Exception as exc:  # a failed call is data for the caller, not a crash
            return {"url": url, "status": 599, "error": exc.__class__.__name__}

    async def handle(self, req: web.Request) -> web.Response:
        if self.work_us:
            await asyncio.sleep(self.work_us / 1e6)
        urls = self.routes.get(req.path)
        if not urls:
            return web.json_response({"service": self.service, "pod": self.pod, "path": req.path},
                                     headers=self.headers())
        fwd = {k: v for k, v in req.headers.items() if k.lower().startswith(("x-canary", "x-request-id"))}
        calls = await asyncio.gather(*(self.call(u, fwd) for u in urls))
        worst = max(int(str(c["status"])) for c in calls)
        status = 200 if worst < 500 else 502
        return web.json_response({"service": self.service, "pod": self.pod, "path": req.path,
                                  "calls": calls}, status=status, headers=self.headers())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.apps.social", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", default=os.environ.get("SERVICE_NAME", "app"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--route", action="append", default=[], metavar="/PATH=URL[,URL...]")
    p.add_argument("--work-us", type=int, default=0, help="simulated work per request")
    args = p.parse_args(argv)
    app_state = App(args.service, parse_routes(args.route), args.work_us)
    app = web.Application()
    app.on_startup.append(app_state.start)
    app.on_cleanup.append(app_state.stop)
    app.router.add_route("*", "/{tail:.*}", app_state.handle)
    web.run_app(app, host="0.0.0.0", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
