"""Upstream of the mirror differential test (tests/kernel_mirror): records what it gets.

Started by the mesh daemon in each pod. Every request is appended as one JSON
line to `LOG_DIR/<pod>.jsonl`: method, path, headers (lower-case names, in
order) and body, so the test can compare what a primary and a mirror received
with the fast path off (Envoy's shadowing) and on (the agent's). A request
whose path starts with `--slow PREFIX` gets no answer: the connection is
closed after 2 s (a slow, broken mirror).

    python mirror_app.py --port 9000 --log-dir /tmp/x [--slow /slow/]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from aiohttp import web


def make_app(log_dir: Path, slow: str | None) -> web.Application:
    pod = os.environ.get("POD_NAME", "?")
    log = (log_dir / f"{pod}.jsonl").open("a", buffering=1)

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        log.write(json.dumps({"method": req.method, "path": req.path_qs,
                              "headers": [[k.decode().lower(), v.decode()] for k, v in req.raw_headers],
                              "body": body.decode(errors="replace")}) + "\n")
        if slow and req.path.startswith(slow):
            await asyncio.sleep(2.0)
            if req.transport is not None:
                req.transport.close()
            raise ConnectionResetError("mirror_app --slow")
        return web.Response(text=f"{pod} {req.method} {req.path_qs} {len(body)}\n",
                            headers={"x-k6-served-by": pod})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-dir", type=Path, required=True)
    ap.add_argument("--slow", help="path prefix answered by closing the connection after 2 s")
    a = ap.parse_args()
    a.log_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(make_app(a.log_dir, a.slow), host="0.0.0.0", port=a.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
