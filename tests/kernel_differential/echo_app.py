"""Echo upstream of the fast-path differential test (tests/kernel_differential).

Started by the mesh daemon in each destination pod (mesh.yaml here). Answers
every request with JSON naming the service and pod that served it, the method,
path and the request headers it received, so the test can compare the chosen
upstream and the headers the mesh added. Each received request's `x-k3-id`
is appended to `LOG_DIR/<pod>.log` (one line per request, flushed at once):
the test reads these files to assert that denied requests never arrived.

    python echo_app.py --port 9000 --log-dir /tmp/x
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aiohttp import web


def make_app(log_dir: Path) -> web.Application:
    service = os.environ.get("SERVICE_NAME", "?")
    pod = os.environ.get("POD_NAME", service)
    version = os.environ.get("K3_VERSION", "v1")
    log = (log_dir / f"{pod}.log").open("a", buffering=1)  # line-buffered: test reads live

    async def handle(req: web.Request) -> web.Response:
        body = await req.read()
        log.write(req.headers.get("x-k3-id", "-") + "\n")
        return web.json_response(
            {"service": service, "version": version, "pod": pod, "method": req.method,
             "path": req.path_qs, "body_len": len(body),
             "headers": {k.lower(): v for k, v in req.headers.items()}},
            headers={"x-k3-served-by": f"{service}/{version}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-dir", type=Path, required=True, help="where <pod>.log files go")
    a = ap.parse_args()
    a.log_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(make_app(a.log_dir), host="0.0.0.0", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
