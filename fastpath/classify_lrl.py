"""Envoy local_ratelimit filter fields beyond the token bucket (proto-JSON).

Called by `fastpath.classify_route.local_rate_limit`; owned by the split.
`reply_headers` turns ``response_headers_to_add`` into the header lines of the
rate-limited reply, as Envoy 1.40's HeaderParser writes them (checked with the
real binary, tests/split/test_lrl_headers.py); `config_reasons` names every
other field the kernel does not reproduce.
"""

from __future__ import annotations

from typing import Any

Reasons = list[str]

# Fields with no effect on a request when no descriptor is configured (and a
# descriptor is a reason of its own), or handled by local_rate_limit itself.
_HARMLESS = {"@type", "statPrefix", "tokenBucket", "filterEnabled", "filterEnforced", "status",
             "responseHeadersToAdd", "vhRateLimits", "alwaysConsumeDefaultTokenBucket",
             "maxDynamicDescriptors"}
# Headers of Envoy's local reply itself: an entry for one of these interacts with
# how Envoy fills them in (content-type "APPEND" replaces text/plain, for one).
_REPLY_OWN = {"content-type", "content-length", "server", "date", "connection",
              "transfer-encoding", "keep-alive"}
_ACTIONS = ("APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
            "OVERWRITE_IF_EXISTS")


def config_reasons(cfg: dict[str, Any]) -> Reasons:
    """Why a LocalRateLimit config needs Envoy, field by field (false/OFF/empty
    values are defaults and do nothing)."""
    reasons = []
    for k in sorted(set(cfg) - _HARMLESS):
        v = cfg[k]
        if v in (False, None, "", [], {}, "OFF", 0):
            continue
        if k == "enableXRatelimitHeaders":
            reasons.append("local_ratelimit enable_x_ratelimit_headers (x-ratelimit-* on every response)")
        else:
            reasons.append(f"local_ratelimit {k}")
    return reasons


def reply_headers(opts: list[dict[str, Any]]) -> tuple[tuple[tuple[str, str], ...], Reasons]:
    """``response_headers_to_add`` -> the (name, value) lines Envoy adds to its
    rate-limited reply, in its order.

    Envoy applies them to the reply's fresh header map (none of these names is
    there): entries whose value is empty are skipped unless keep_empty_value;
    OVERWRITE_IF_EXISTS finds nothing; the OVERWRITE_IF_EXISTS_OR_ADD entries
    are set first (the last one of a name wins), then every APPEND/ADD_IF_ABSENT
    entry is added (ADD_IF_ABSENT looks at the map *before* the adds, so two of
    one name both land). Only the rate-limited reply gets them, not a response
    of a request that passed."""
    sets: dict[str, str] = {}
    adds: list[tuple[str, str]] = []
    reasons: Reasons = []
    for o in opts:
        kv = o.get("header", {})
        name, value = str(kv.get("key", "")).lower(), str(kv.get("value", kv.get("rawValue", "")))
        action = _action(o)
        where = f"local_ratelimit response header {name!r}"
        if action not in _ACTIONS:
            reasons.append(f"{where} append_action {action}")
        if "%" in value:
            reasons.append(f"{where} value uses a substitution formatter")
        if name in _REPLY_OWN or name.startswith(":") or not name:
            reasons.append(f"{where}: a header of the local reply itself")
        if any(c in name + value for c in "\r\n\0"):
            reasons.append(f"{where}: CR/LF/NUL")
        if (not value and not o.get("keepEmptyValue")) or action == "OVERWRITE_IF_EXISTS":
            continue
        if action == "OVERWRITE_IF_EXISTS_OR_ADD":
            sets[name] = value
        else:
            adds.append((name, value))
    return (*sets.items(), *adds), reasons


def _action(o: dict[str, Any]) -> str:
    if "append" in o and "appendAction" not in o:  # deprecated BoolValue form
        return "APPEND_IF_EXISTS_OR_ADD" if o["append"] else "OVERWRITE_IF_EXISTS_OR_ADD"
    return str(o.get("appendAction", "APPEND_IF_EXISTS_OR_ADD"))
