"""Request mirroring (Envoy's shadowing), the sans-I/O part.

Owner: the mirror part of K2. Called by the classifier (`mirror_policies`:
Envoy's `request_mirror_policies` -> plan.MirrorPolicy), the reference model
(`sampled`) and the agent's sender (`fastpath.agent_mirror`: `shadow_request`,
`response_done`). The kernel half is bpf_src/dp_mirror.h.

What Envoy does (router.cc, checked against the real Envoy by
tests/kernel_mirror): each policy whose runtime_fraction samples the request
sends one copy of it (the head as the router forwards it, i.e. after the
route's request_headers_to_add, and the body) to its cluster, with
`-shadow` appended to the host name (before a port), fire-and-forget: the
client's answer is the primary's, whatever the shadow does.
"""

from __future__ import annotations

from typing import Any

from fastpath.plan import Cluster, MirrorPolicy, Verdict

Reasons = list[str]

MIRRORS_MAX = 4  # policies per route the kernel samples (DP_MIRRORS, bpf_src/dp_mirror.h)
_KNOWN = {"cluster", "runtimeFraction", "traceSampled", "disableShadowHostSuffixAppend"}


def _per_million(frac: dict[str, Any]) -> int:
    denom = {"HUNDRED": 100, "TEN_THOUSAND": 10_000,
             "MILLION": 1_000_000}[frac.get("denominator", "HUNDRED")]
    return min(1_000_000, int(frac.get("numerator", 0)) * (1_000_000 // denom))


def mirror_policies(items: list[dict[str, Any]] | None, clusters: dict[str, Cluster]
                    ) -> tuple[tuple[MirrorPolicy, ...], Reasons]:
    """RouteAction.request_mirror_policies (proto-JSON) -> (policies, reasons for
    Envoy). `clusters` maps plan cluster names to plan.Cluster (a mirror to a
    cluster the kernel cannot reach stays Envoy's). A runtime key is read with
    its default value (no runtime layer here, as in the rest of the split);
    trace_sampled only matters to a tracer, which the kernel path has none of."""
    out: list[MirrorPolicy] = []
    reasons: Reasons = []
    for i, m in enumerate(items or []):
        where = f"request_mirror_policies[{i}]"
        reasons += [f"{where} {k}" for k in sorted(set(m) - _KNOWN - {"clusterHeader"})]
        name = m.get("cluster")
        if not name:
            # the cluster is named per request: any of the node's clusters, or
            # none, would have to be handled as Envoy does (not built)
            reasons.append(f"{where} clusterHeader" if m.get("clusterHeader")
                           else f"{where} without a cluster name")
            continue
        c = clusters.get(name)
        if c is None:
            reasons.append(f"mirror cluster {name!r} not defined")
        elif c.verdict is not Verdict.KERNEL:
            reasons.append(f"mirror cluster {name!r}: {c.reason}")
        elif not c.endpoints:
            reasons.append(f"mirror cluster {name!r} has no endpoints")
        frac = m.get("runtimeFraction")
        per = 1_000_000 if frac is None else _per_million(frac.get("defaultValue", {}))
        out.append(MirrorPolicy(name, per, not m.get("disableShadowHostSuffixAppend", False)))
    if len(out) > MIRRORS_MAX:
        reasons.append(f"more than {MIRRORS_MAX} request_mirror_policies")
    return tuple(out), reasons


def sampled(per_million: int, draw: int) -> bool:
    """The kernel's draw (bpf_get_prandom_u32) against a policy's fraction."""
    return draw % 1_000_000 < per_million


def shadow_host(host: str) -> str:
    """Envoy's shadowAppendedHost: `-shadow` after the name, before a port."""
    colon = host.rfind(":")
    if colon >= 0 and host.rfind("]") < colon:
        port = host[colon + 1:]
        if port.isdigit() and int(port) <= 65535:
            return f"{host[:colon]}-shadow{host[colon:]}"
    return host + "-shadow"


def shadow_request(req: bytes, suffix: bool = True, xff: str | None = None) -> bytes:
    """The kernel's copy of a request (head + body) as the shadow: the Host
    header's value with `-shadow` appended (when `suffix`), and `xff` (the
    sidecar's own address) appended to x-forwarded-for as Envoy's async client
    does for a shadow (seen with the real Envoy 1.40: the primary does not get
    it, the shadow does). Raises ValueError on bytes that are not an HTTP/1
    request head with a Host header."""
    end = req.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError(f"mirror copy without a complete head ({len(req)} bytes)")
    lines = req[:end].split(b"\r\n")
    host_at = -1
    for i, line in enumerate(lines[1:], 1):
        name, sep, value = line.partition(b":")
        lname = name.strip().lower()
        if sep and lname == b"host" and host_at < 0:
            host_at = i
            if suffix:
                lines[i] = name + b": " + shadow_host(value.strip().decode("latin-1")).encode("latin-1")
        elif sep and lname == b"x-forwarded-for" and xff:
            lines[i] = name + b": " + value.strip() + b"," + xff.encode()
            xff = None
    if host_at < 0:
        raise ValueError("mirror copy without a Host header")
    if xff:
        lines.append(b"x-forwarded-for: " + xff.encode())
    return b"\r\n".join(lines) + req[end:]


def request_method(req: bytes) -> str:
    return req.split(b" ", 1)[0].decode("latin-1")
