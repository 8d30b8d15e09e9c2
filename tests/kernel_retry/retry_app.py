"""Upstream of the retry differential test (tests/kernel_retry): fails on purpose.

Started by the mesh daemon in each destination pod. Every request's `x-k3-id`
is appended to `LOG_DIR/<pod>.log`; the request's attempt number is the count
of that id over all pods' logs (attempts of one request are sequential). How
an attempt fails is said by request headers, so one app serves every case:

* `x-fail: N`        attempts 1..N fail (default status 503)
* `x-fail-pod: POD`  only attempts on that pod fail (with x-fail)
* `x-fail-status: S` fail with status S
* `x-fail-grpc: G`   fail with status 200 and header grpc-status: G
* `x-overloaded: 1`  failures carry x-envoy-overloaded: true
* `x-ratelimited: 1` failures carry x-envoy-ratelimited: true
* `x-chunked: 1`     failures are sent chunked

A failure's body names the attempt, not the pod (the first endpoint Envoy and
the kernel pick may differ); a success is JSON with the attempt, the pod, the
request body's length and the headers received.

    python retry_app.py --port 9000 --log-dir /tmp/x
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from aiohttp import web


def attempts_of(log_dir: Path, rid: str) -> int:
    return sum(f.read_text().split().count(rid) for f in log_dir.glob("*.log"))


def make_app(log_dir: Path) -> web.Application:
    pod = os.environ.get("POD_NAME", "?")
    log = (log_dir / f"{pod}.log").open("a", buffering=1)

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        rid = req.headers.get("x-k3-id", "-")
        log.write(f"{rid} @{time.time_ns()}\n")  # the test orders attempts by time
        log.flush()
        attempt = attempts_of(log_dir, rid)
        fail_n = int(req.headers.get("x-fail", "0"))
        only = req.headers.get("x-fail-pod")
        if attempt <= fail_n and (only is None or only == pod):
            status = int(req.headers.get("x-fail-status", "503"))
            hdrs = {"x-k3-attempt": str(attempt)}
            if "x-fail-grpc" in req.headers:
                status, hdrs["grpc-status"] = 200, req.headers["x-fail-grpc"]
            if req.headers.get("x-overloaded"):
                hdrs["x-envoy-overloaded"] = "true"
            if req.headers.get("x-ratelimited"):
                hdrs["x-envoy-ratelimited"] = "true"
            text = f"failed attempt {attempt}\n"
            if req.headers.get("x-chunked"):
                resp = web.StreamResponse(status=status, headers=hdrs)
                resp.enable_chunked_encoding()
                await resp.prepare(req)
                await resp.write(text.encode())
                await resp.write_eof()
                return resp
            return web.Response(status=status, text=text, headers=hdrs)
        return web.json_response(
            {"attempt": attempt, "pod": pod, "body_len": len(body),
             "headers": {k.lower(): v for k, v in req.headers.items()}},
            headers={"x-k3-attempt": str(attempt), "x-k3-served-by": pod})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-dir", type=Path, required=True)
    a = ap.parse_args()
    a.log_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(make_app(a.log_dir), host="0.0.0.0", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
