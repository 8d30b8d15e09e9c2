"""Hop-by-hop request headers: what Envoy 1.40 does with them, and what the kernel path does.

Owner: hop. Pure. Callers: `fastpath.reference` (the kernel's decision uses
`kernel_hop`), `fastpath.classify_match` (`MATCH_AFTER_REMOVAL`), and the unit
tests, which hold `kernel_hop` to `envoy_hop` (whenever the kernel keeps a
request, it forwards what Envoy forwards and Envoy would not close).
`bpf_src/dp_hop.h` is `kernel_hop` in C.

`envoy_hop` is the behaviour measured on the real binary (an upstream that
echoes the head it got; docs/fastpath.md "Hop-by-hop request headers"):
Connection, Keep-Alive and Proxy-Connection are removed; every other token of
Connection names a header that is removed too (a `te` token excepted);
`close` in Connection, or Proxy-Connection `close`, makes Envoy close the
client's connection after its response; TE is kept as `trailers` when one of
its comma-separated members is exactly `trailers` (case-sensitive, no
parameters), removed otherwise (an empty TE stays empty). Envoy's routes see
the headers after this removal.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = tuple[tuple[str, str], ...]

# Removed by Envoy before its routes match: a matcher on them cannot be
# evaluated by the kernel, which matches on the head as the client wrote it.
MATCH_AFTER_REMOVAL = frozenset({"connection", "keep-alive", "proxy-connection"})
KERNEL_MAX_REMOVED = 3  # dp_hop.h DP_HOP_MAX


@dataclass(frozen=True)
class HopOutcome:
    """`closes`: the client's connection is closed after the response;
    `headers`: what goes on to the upstream (names lower case)."""

    closes: bool
    headers: Headers


def _tokens(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def envoy_hop(headers: Headers) -> HopOutcome:
    """Envoy's treatment of an HTTP/1.1 request's headers (`headers` lower-case names)."""
    conn = [t.lower() for n, v in headers if n == "connection" for t in _tokens(v)]
    nominated = {t for t in conn if t not in ("close", "keep-alive", "te", "upgrade")}
    closes = "close" in conn or any(n == "proxy-connection" and v.strip().lower() == "close"
                                    for n, v in headers)
    tes = [v for n, v in headers if n == "te"]
    out: list[tuple[str, str]] = []
    te_done = False
    for n, v in headers:
        if n in MATCH_AFTER_REMOVAL or n in nominated:
            continue
        if n == "te":
            if te_done:
                continue
            te_done = True
            joined = ",".join(tes)
            if joined.strip() and "trailers" not in _tokens(joined):
                continue
            v = "trailers" if joined.strip() else v
        out.append((n, v))
    return HopOutcome(closes, tuple(out))


def kernel_hop(headers: Headers) -> tuple[str, Headers]:
    """What the kernel path does (dp_hop.h): ("", headers it forwards) when it
    keeps the request, else (the envoy/<reason> counter's reason, headers).
    The kernel recognises the forms clients write, `name: value` with the value
    exactly keep-alive / close / trailers; anything else about these headers
    goes to Envoy (the C code is stricter about spacing: more than one space
    after the colon or any after the value also means Envoy). Checked line by
    line in order, the first line that needs Envoy giving the reason, as in C."""
    removed = 0
    tes = 0
    out: list[tuple[str, str]] = []
    for n, v in headers:
        low = v.lower()
        if n == "te":
            tes += 1
            if v != "trailers" or tes > 1:
                return "hop_header", headers
        elif n in ("connection", "proxy-connection") and low != "keep-alive":
            return ("conn_close" if low == "close" else "hop_header"), headers
        if n in MATCH_AFTER_REMOVAL:
            removed += 1
            if removed > KERNEL_MAX_REMOVED:
                return "hop_header", headers
            continue
        out.append((n, v))
    return "", tuple(out)
