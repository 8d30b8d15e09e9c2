"""mesh.apps.spans, the mesh's Zipkin collector: records what is POSTed, lists it."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from mesh.apps.spans import make_app


def test_records_posted_spans_and_lists_them_by_trace() -> None:
    async def run() -> None:
        async with TestClient(TestServer(make_app())) as c:
            spans = [{"traceId": "a1", "id": "a1", "kind": "CLIENT"},
                     {"traceId": "b2", "id": "b2", "kind": "SERVER"}]
            r = await c.post("/api/v2/spans", json=spans)
            assert r.status == 202
            r = await c.post("/api/v2/spans", data=b"{not json")
            assert r.status == 400
            r = await c.post("/api/v2/spans", json={"traceId": "c"})
            assert r.status == 400
            assert await (await c.get("/spans")).json() == spans
            assert await (await c.get("/spans?trace=b2")).json() == spans[1:]

    asyncio.run(run())
