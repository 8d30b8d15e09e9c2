"""Zipkin collector app: records the spans the mesh's sidecars report.

Started by the mesh daemon as a service's command, for a policy whose
`tracing.provider` is Zipkin with `collector_cluster: <that service>`
(docs/mesh.md "Tracing"): the collector is a service of the mesh, never an
outside address. Envoy POSTs JSON v2 span lists to `collector_endpoint`
(any path is taken); `GET /spans` answers the spans recorded so far, in
order (`?trace=ID`: those of one trace id), for the user and the tests.
Spans live in memory, the newest MAX_SPANS of them; how many older ones
were dropped is the `X-Spans-Dropped` header of every `GET /spans`.
Nothing is written to disk.

    python -m mesh.apps.spans --port 9411
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from typing import Any

from aiohttp import web

MAX_SPANS = 10_000  # kept in memory: the newest; older ones are dropped and counted


class Store:
    """The newest `limit` spans, and how many older ones were dropped."""

    def __init__(self, limit: int) -> None:
        self.spans: deque[dict[str, Any]] = deque(maxlen=limit)
        self.dropped = 0

    def add(self, spans: list[dict[str, Any]]) -> None:
        limit = self.spans.maxlen or 0
        self.dropped += max(0, len(self.spans) + len(spans) - limit)
        self.spans.extend(spans)


SPANS = web.AppKey("spans", Store)


def make_app(limit: int = MAX_SPANS) -> web.Application:
    app = web.Application()
    app[SPANS] = Store(limit)

    async def report(req: web.Request) -> web.Response:
        body = await req.read()
        try:
            spans = json.loads(body)
        except ValueError:
            spans = None
        if not isinstance(spans, list) or not all(isinstance(s, dict) for s in spans):
            # said in the app's log: the tracer's settings are wrong
            print(f"refused a report ({req.content_type}): {body[:200]!r}", file=sys.stderr, flush=True)
            return web.Response(status=400, text="expected a JSON list of span objects (Zipkin v2)\n")
        req.app[SPANS].add(spans)
        return web.Response(status=202)

    async def listing(req: web.Request) -> web.Response:
        store = req.app[SPANS]
        trace = req.query.get("trace")
        return web.json_response([s for s in store.spans if trace is None or s.get("traceId") == trace],
                                 headers={"X-Spans-Dropped": str(store.dropped)})

    app.router.add_get("/spans", listing)
    app.router.add_post("/{tail:.*}", report)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    web.run_app(make_app(), host="0.0.0.0", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
