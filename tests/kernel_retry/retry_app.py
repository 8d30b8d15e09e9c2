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
* `x-delays: A,B,..` attempt 1 answers after A ms, attempt 2 after B ms, ...
* `x-body-delay-ms: N` a success sends its head and 3 body bytes, the rest N ms later
* `x-close: N`       attempts 1..N close the connection without an answer (an app that
                     crashes mid-request)

Each log line also records the attempt's x-envoy-expected-rq-timeout-ms ("-": none).

A failure's body names the attempt, not the pod (the first endpoint Envoy and
the kernel pick may differ); a success is JSON with the attempt, the pod, the
request body's length and the headers received.

    python retry_app.py --port 9000 --log-dir /tmp/x
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
        expected = req.headers.get("x-envoy-expected-rq-timeout-ms", "-")
        log.write(f"{rid} @{time.time_ns()} {expected}\n")  # the test orders attempts by time
        log.flush()
        attempt = attempts_of(log_dir, rid)
        delays = [int(d) for d in req.headers.get("x-delays", "").split(",") if d.strip()]
        if attempt <= len(delays) and delays[attempt - 1]:
            await asyncio.sleep(delays[attempt - 1] / 1000)
        if attempt <= int(req.headers.get("x-close", "0")) and req.transport is not None:
            req.transport.close()  # no answer: the connection closes (FIN)
            return web.Response()  # written to a closed transport: dropped
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
        ok = {"attempt": attempt, "pod": pod, "body_len": len(body),
              "headers": {k.lower(): v for k, v in req.headers.items()}}
        hdrs = {"x-k3-attempt": str(attempt), "x-k3-served-by": pod}
        if req.headers.get("x-body-delay-ms"):
            return await slow_body(req, json.dumps(ok).encode(), hdrs,
                                   int(req.headers["x-body-delay-ms"]))
        return web.json_response(ok, headers=hdrs)

    async def slow_body(req: web.Request, data: bytes, hdrs: dict[str, str],
                        ms: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=hdrs)
        resp.content_type = "application/json"
        resp.content_length = len(data)
        await resp.prepare(req)
        await resp.write(data[:3])  # the response has started
        await asyncio.sleep(ms / 1000)
        await resp.write(data[3:])
        await resp.write_eof()
        return resp

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
