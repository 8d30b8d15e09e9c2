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


def test_refuses_a_list_of_anything_but_span_objects() -> None:
    """`[1]` was taken (202), and every later GET /spans?trace= failed (500)."""
    async def run() -> None:
        async with TestClient(TestServer(make_app())) as c:
            for body in ([1], [{"traceId": "a"}, "b"], [[]]):
                r = await c.post("/api/v2/spans", json=body)
                assert r.status == 400, body
            r = await c.get("/spans?trace=a")
            assert r.status == 200 and await r.json() == []

    asyncio.run(run())


def test_keeps_the_newest_spans_and_counts_the_dropped() -> None:
    async def run() -> None:
        async with TestClient(TestServer(make_app(limit=3))) as c:
            spans = [{"traceId": str(i), "id": str(i)} for i in range(5)]
            assert (await c.post("/api/v2/spans", json=spans[:2])).status == 202
            r = await c.get("/spans")
            assert await r.json() == spans[:2] and r.headers["X-Spans-Dropped"] == "0"
            assert (await c.post("/api/v2/spans", json=spans[2:])).status == 202
            r = await c.get("/spans")
            assert await r.json() == spans[2:] and r.headers["X-Spans-Dropped"] == "2"
            r = await c.get("/spans?trace=4")
            assert await r.json() == spans[4:] and r.headers["X-Spans-Dropped"] == "2"

    asyncio.run(run())
