"""Who served one `l7fp mesh audit` request, from counter changes and the answer: sans-I/O.

Called by mesh.audit (`send_probes`, `format_rows`) and mesh.cli (`summary`
for the exit status). Reads only the probe (fastpath.audit_probe), the
sender's fast-path counter changes (`/debug/fastpath`, fastpath.counters),
the pod client's answer and the sender's node entry. Only a plain "kernel"
row counts as served by the kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastpath.audit_probe import Probe
from fastpath.tracing import SAMPLED_REASON

KERNEL_OUTCOMES = ("fast", "kernel_reply", "retry")
# Requests at most for one route while the kernel hands them to Envoy as
# trace_sampled: at 30 % sampling all 8 are sampled with p = 0.3^8 ~ 7e-5
# (60 %: 1.7 %); at 100 % every one is, and the row stays "envoy".
TRACE_SAMPLED_TRIES = 8


def summary(rows: list[Any]) -> dict[str, Any]:
    """Totals of mesh.audit's Rows: served by the kernel (plain "kernel" only),
    audited (not skipped), skipped, and "served: why" -> count of the others."""
    audited = [r for r in rows if r.served != "skipped"]
    punts = Counter(f"{r.served}: {r.why}" for r in audited if r.served != "kernel")
    return {"kernel": sum(r.served == "kernel" for r in audited), "audited": len(audited),
            "skipped": sum(r.served == "skipped" for r in rows), "not_kernel": dict(punts)}


def classify(probe: Probe, delta: Counter[tuple[str, str, str]]) -> tuple[str, str, dict[str, int]]:
    """(served, why, counters) from the node's counter changes during one request.

    Counted are the routes of the probed route's virtual host (and of the
    caller's route's, for an inbound probe), the destinations' merged inbound
    routes (`virtualInbound@...`) and "" (no route): the kernel counts the
    request on one of them. Other virtual hosts' counts are other traffic.
    The probe's own route is `probe.counted_as` (an inbound route's: under
    this destination's merged listener); a count on any other of those
    routes (the kernel matched, or punted at, an earlier route, or picked a
    replica) is named in `why`: "(counted on ROUTE)", and a kernel outcome
    there is "kernel (other route)", not "kernel". More than one request
    counted on them (other traffic during the probe) is "ambiguous"."""
    own = {probe.counted_as, probe.via, ""}
    vhosts = tuple(_vhost_of(n) for n in (probe.counted_as, probe.via) if n)
    mine = {k: n for k, n in delta.items() if n > 0 and (
        k[0] in own or k[0].startswith(("virtualInbound@", *vhosts)))}
    shown = {f"{r} {o}/{why}".rstrip("/"): n for (r, o, why), n in sorted(mine.items())}
    others = sorted({r for (r, _o, _w) in mine if r not in own})
    served, why = _served(mine, others)
    n = requests(mine)
    if n > 1:
        return "ambiguous", f"{n} requests counted during it: {served} ({why})", shown
    return served, why, shown


def _served(mine: dict[tuple[str, str, str], int], others: list[str]) -> tuple[str, str]:
    note = f" (counted on {', '.join(others)})" if others else ""
    envoy = sorted({why or "?" for (_r, o, why) in mine if o == "envoy"})
    if envoy:
        return "envoy", ",".join(envoy) + note
    kernel = sorted({o for (_r, o, _w) in mine if o in KERNEL_OUTCOMES})
    if kernel:
        return ("kernel (other route)" if others else "kernel"), ",".join(kernel) + note
    if mine:
        return "unseen", "outcomes " + ",".join(sorted({o for (_r, o, _w) in mine})) + note
    return "unseen", "no fast-path counter moved (the kernel did not decide it)"


# Counts that are no request of their own (datapath.h, dp_retry.h, dp_mirror.h):
# a head waiting for bytes, a diverted response, a lost shadow copy, and a
# forwarded request's second count when its retry copy failed.
_NOT_A_REQUEST = {"cork", "retry", "shadow_lost"}
_SECOND_COUNT = {("fast", "retry_overflow"), ("fast", "retry_lost")}


def requests(mine: dict[tuple[str, str, str], int]) -> int:
    """How many requests the counter changes `mine` ((route, outcome, reason) -> n) hold."""
    return sum(n for (_r, o, why), n in mine.items()
               if o not in _NOT_A_REQUEST and (o, why) not in _SECOND_COUNT)


def sampled_away(served: str, why: str) -> bool:
    """The kernel took the probe's route and handed the request to Envoy only
    because the x-request-id it made for it was sampled (a Zipkin listener:
    Envoy reports the span, bpf_src/dp_xrid.h DP_R_TRACE_SAMPLED). Not a
    failure of the kernel path, and no proof of it either: mesh.audit sends
    the request again (another id), up to TRACE_SAMPLED_TRIES in all. A
    probe cannot bring its own unsampled id: on a tracing listener the
    kernel hands every request with an x-request-id to Envoy (trace_header)."""
    return served == "envoy" and why == SAMPLED_REASON


def after_sampled(served: str, why: str, sampled: int) -> tuple[str, str]:
    """(served, why) of a route's last request once `sampled` requests before it
    were `sampled_away`: said in `why`; a row whose every request was sampled
    stays "envoy"."""
    if not sampled:
        return served, why
    if sampled_away(served, why):
        return served, f"{why} ({sampled + 1} of {sampled + 1} requests: every id the kernel " \
                       f"made was sampled, the kernel path not shown)"
    return served, f"{why}; {sampled} request(s) before it {SAMPLED_REASON}"


def check_answer(probe: Probe, served: str, why: str, got: dict[str, Any]) -> tuple[str, str]:
    """(served, why) once the pod client's answer `got` is seen: a request the
    kernel took but that got no answer is "kernel (no answer)"; a status other
    than the reply the reference model says the kernel must give
    (`probe.reply`) is "kernel (wrong status)"."""
    status = got.get("status")
    if got.get("error") and served == "kernel":
        return "kernel (no answer)", f"{why}; {got['error']}"
    if probe.reply is None or not status or status == probe.reply:
        return served, why
    why = f"{why}; expected status {probe.reply}, got {status}".lstrip("; ")
    return ("kernel (wrong status)" if served == "kernel" else served), why


def check_plan(probe: Probe, served: str, why: str,
               node: dict[str, Any] | None) -> tuple[str, str]:
    """(served, why) once the sender's node (`/debug/fastpath`) is seen: an inbound
    probe derived from another version of the destination's plan than the one
    the sender's kernel merged is "kernel (other plan)" (the expectation and
    the route may not be what the kernel ran)."""
    if probe.dst is None or node is None:
        return served, why
    merged = node.get("inbound_plans", {}).get(f"{probe.dst[0]}:{probe.dst[1]}")
    if merged is None or merged == probe.dst_version:
        return served, why
    why = f"{why}; the sender's kernel merged destination plan {merged}, the audit read " \
          f"{probe.dst_version}"
    return ("kernel (other plan)" if served == "kernel" else served), why


def _vhost_of(route: str) -> str:
    """"LISTENER/VHOST/" of a counter's route name "LISTENER/VHOST/ROUTE"."""
    return "/".join(route.split("/", 2)[:2]) + "/"
