"""The agent's redirect reply (fastpath/agent_redirect.py), sans I/O: the head
parse and the bytes sent, with the Location of the reference model."""

from __future__ import annotations

from fastpath.agent_redirect import parse_head, redirect_reply
from fastpath.plan import PathKind, Redirect, Route, RouteMatch, Verdict

DATE = "Thu, 26 Nov 2026 13:00:00 GMT"


def test_reply_as_envoy_sends_it() -> None:
    r = Route(name="r", match=RouteMatch(PathKind.PREFIX, "/"),
              action=Redirect(status=302, scheme="https"), verdict=Verdict.KERNEL)
    req = parse_head(b"GET /p?x=1 HTTP/1.1\r\nhOsT:  h:80 \r\nx: y\r\n\r\n")
    assert req is not None and (req.method, req.path, req.host) == ("GET", "/p?x=1", "h:80")
    assert redirect_reply(r.action, r, req, DATE) == (
        b"HTTP/1.1 302 Found\r\nlocation: https://h/p?x=1\r\ndate: " + DATE.encode() +
        b"\r\nserver: envoy\r\ncontent-length: 0\r\n\r\n")
    head = parse_head(b"HEAD /p HTTP/1.1\r\nHost: H.Example:443\r\n\r\n")
    assert head is not None
    assert b"location: https://H.Example:443/p\r\n" in redirect_reply(r.action, r, head, DATE)
    assert redirect_reply(r.action, r, head, DATE).endswith(b"transfer-encoding: chunked\r\n\r\n")


def test_heads_it_cannot_answer() -> None:
    assert parse_head(b"GET /p HTTP/1.1\r\n\r\n") is None  # no Host
    assert parse_head(b"GET /p HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") is None
    assert parse_head(b"GET http://a/p HTTP/1.1\r\nHost: a\r\n\r\n") is None
    assert parse_head(b"garbage") is None
