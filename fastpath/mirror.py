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
_KNOWN = {"cluster", "clusterHeader", "runtimeFraction", "traceSampled",
          "disableShadowHostSuffixAppend"}
# Static clusters of the sidecar bootstraps L7FP knows (xds_server.bootstrap,
# mesh.envoyconf, istio-proxy's): Envoy has them, the split never sees them, so
# a cluster_header naming one is handed to Envoy (guard entries, below).
BOOTSTRAP_CLUSTERS = ("l7fp_xds", "xds-grpc", "sds-grpc", "prometheus_stats", "agent")
HEADER_GUARDS_MAX = 8  # clusters per cluster_header route the kernel hands to Envoy by name


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
        reasons += [f"{where} {k}" for k in sorted(set(m) - _KNOWN)]
        name = m.get("cluster") or ""
        header = str(m.get("clusterHeader") or "").lower()
        if not name and not header:
            reasons.append(f"{where} without a cluster name")
            continue
        if name:
            reasons += _named_reasons(name, clusters)
        frac = m.get("runtimeFraction")
        per = 1_000_000 if frac is None else _per_million(frac.get("defaultValue", {}))
        out.append(MirrorPolicy(name, per, not m.get("disableShadowHostSuffixAppend", False),
                                "" if name else header))
    if len(out) > MIRRORS_MAX:
        reasons.append(f"more than {MIRRORS_MAX} request_mirror_policies")
    return tuple(out), reasons


def _named_reasons(name: str, clusters: dict[str, Cluster]) -> Reasons:
    c = clusters.get(name)
    if c is None:
        return [f"mirror cluster {name!r} not defined"]
    if c.verdict is not Verdict.KERNEL:
        return [f"mirror cluster {name!r}: {c.reason}"]
    if not c.endpoints:
        return [f"mirror cluster {name!r} has no endpoints"]
    return []


def shadows_like_envoy(c: Cluster) -> bool:
    """True when the agent sends a shadow to cluster `c` exactly as Envoy does:
    a KERNEL cluster (its endpoints, or none: Envoy then finds no healthy host
    and sends nothing, as the agent), or an ORIGINAL_DST cluster without
    use_http_header (Envoy's shadow finds no host there: Envoy 1.40 counts
    upstream_cx_none_healthy and sends nothing; the agent has no endpoint)."""
    return c.verdict is Verdict.KERNEL or c.original_dst


def header_guard_names(policies: tuple[MirrorPolicy, ...], clusters: dict[str, Cluster]
                       ) -> tuple[tuple[tuple[str, str], ...], Reasons]:
    """(header, cluster name) pairs whose requests must go to Envoy for the
    route's cluster_header policies to stay exact: the node's clusters the agent
    cannot shadow to as Envoy would, and the bootstraps' static clusters. The
    classifier puts one guard punt entry per pair before the route (an exact
    header matcher; the kernel hands a request with the header twice to Envoy
    anyway). More than HEADER_GUARDS_MAX: a reason for Envoy instead."""
    headers = sorted({p.cluster_header for p in policies if p.cluster_header})
    if not headers:
        return (), []
    names = [n for n, c in sorted(clusters.items()) if not shadows_like_envoy(c)]
    names += [n for n in BOOTSTRAP_CLUSTERS if n not in clusters]
    pairs = tuple((h, n) for h in headers for n in names)
    if len(pairs) > HEADER_GUARDS_MAX + len(BOOTSTRAP_CLUSTERS) * len(headers):
        bad = [n for n in names if n not in BOOTSTRAP_CLUSTERS]
        return (), [f"request_mirror_policies cluster_header may name {len(bad)} clusters the "
                    f"kernel path cannot shadow to ({', '.join(repr(n) for n in bad[:3])}, ...)"]
    return pairs, []


def header_cluster(head: bytes, header: str) -> str | None:
    """The cluster a cluster_header policy names in a request head (bytes up to
    the blank line or the whole request): the first `header` line's value
    without surrounding whitespace, None when absent or empty (Envoy 1.40:
    getShadowCluster reads the first value; a comma-joined one names no cluster)."""
    end = head.find(b"\r\n\r\n")
    lines = (head if end < 0 else head[:end]).split(b"\r\n")[1:]
    want = header.lower().encode("latin-1")
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == want:
            v = value.strip(b" \t").decode("latin-1")
            return v or None
    return None


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
