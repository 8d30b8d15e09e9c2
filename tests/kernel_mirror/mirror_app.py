"""Upstream of the mirror differential test (tests/kernel_mirror): records what it gets.

Started by the mesh daemon in each pod. Every request is appended as one JSON
line to `LOG_DIR/<pod>.jsonl`: method, path, headers (lower-case names, in
order) and body, so the test can compare what a primary and a mirror received
with the fast path off (Envoy's shadowing) and on (the agent's). `--delay S`
answers after S seconds (a slow mirror); `--reset` closes the connection
without an answer (a broken mirror).

    python mirror_app.py --port 9000 --log-dir /tmp/x [--delay 2] [--reset]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from aiohttp import web


def make_app(log_dir: Path, delay: float, reset: bool) -> web.Application:
    pod = os.environ.get("POD_NAME", "?")
    log = (log_dir / f"{pod}.jsonl").open("a", buffering=1)

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        log.write(json.dumps({"method": req.method, "path": req.path_qs,
                              "headers": [[k.decode().lower(), v.decode()] for k, v in req.raw_headers],
                              "body": body.decode(errors="replace")}) + "\n")
        if delay:
            await asyncio.sleep(delay)
        if reset and req.transport is not None:
            req.transport.close()
            raise ConnectionResetError("mirror_app --reset")
        return web.Response(text=f"{pod} {req.method} {req.path_qs} {len(body)}\n",
                            headers={"x-k6-served-by": pod})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-dir", type=Path, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--reset", action="store_true")
    a = ap.parse_args()
    a.log_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(make_app(a.log_dir, a.delay, a.reset), host="0.0.0.0", port=a.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
