"""Reset cases of the retry test (NAME=reset): retry_on `5xx`, `gateway-error`,
`reset` and istiod's default policy when the app answers 5xx or closes the
connection without answering (retry_app.py `x-close`).

Used by test_retry_onoff.py (the `envoy` variant's mesh sends these requests
after its own, fast path off and on: the `/x5`, `/xg`, `/xr` routes of
policies.yaml, and the catch-all with istiod's policy). What Envoy does in the
mesh: the destination's sidecar answers an app's close with a 503 response
("... reset reason: connection termination"), which the client's sidecar
retries by its status (5xx, gateway-error, retriable-status-codes 503), not as
a reset (`reset` alone does not retry it).
"""

from __future__ import annotations

from typing import Any

RESET_BODY = ("upstream connect error or disconnect/reset before headers. "
              "reset reason: connection termination")

# (service, route prefix, headers, method, body, expected status, attempts)
CASES: list[tuple[str, str, dict[str, str], str, str, int, int]] = [
    ("flaky", "x5", {"x-fail": "1", "x-fail-status": "500"}, "GET", "", 200, 2),
    ("flaky", "x5", {"x-close": "1"}, "GET", "", 200, 2),
    ("flaky", "x5", {"x-fail": "5", "x-fail-status": "502"}, "GET", "", 502, 3),
    ("flaky", "x5", {"x-close": "5"}, "GET", "", 503, 3),  # the last close: the 503
    ("flaky", "xg", {"x-fail": "1", "x-fail-status": "504"}, "GET", "", 200, 2),
    ("flaky", "xg", {"x-fail": "1", "x-fail-status": "500"}, "GET", "", 500, 1),
    ("flaky", "xg", {"x-close": "1"}, "POST", "k=v", 200, 2),
    ("flaky", "xr", {"x-close": "1"}, "GET", "", 503, 1),  # a 503 response, not a reset
    ("flaky", "xr", {"x-fail": "1", "x-fail-status": "500"}, "GET", "", 500, 1),
    ("flaky", "c", {"x-close": "1"}, "GET", "", 200, 2),  # istiod's policy (503)
    ("solo", "x5", {"x-close": "1"}, "GET", "", 200, 2),  # the same pod, a new connection
    # per-try timeouts (600 ms) under 5xx / gateway-error: Envoy resets the
    # attempt and retries it (Istio's retry_on does not: deadline_cases.py)
    ("solo", "xp", {"x-delays": "1500"}, "GET", "", 200, 2),
    ("solo", "xp", {"x-delays": "1500,1500,1500"}, "GET", "", 504, 3),
    ("solo", "xp", {"x-delays": "300"}, "GET", "", 200, 1),
    ("flaky", "xq", {"x-delays": "1500"}, "GET", "", 200, 2),
]
# case -> (min s, max s) of the answer (generous: 2 shared cores)
TIMES = {11: (0.55, 1.5), 12: (1.7, 3.2), 13: (0.25, 0.9), 14: (0.55, 1.5)}
N_PER_TRY_RETRIES = 1 + 2 + 1  # per-try timeouts the agent retried (not the last one)
N_504 = sum(1 for c in CASES if c[5] == 504)


def gen_requests() -> list[dict[str, Any]]:
    reqs = []
    for i, (svc, prefix, hdrs, method, body, *_) in enumerate(CASES):
        port = 9000 if svc == "flaky" else 9100
        reqs.append({"svc": svc, "vip": svc, "port": port, "method": method,
                     "path": f"/{prefix}/r{i}", "body": body, "reset": i,
                     "headers": {"host": f"{svc}:{port}", **hdrs, "x-k3-id": f"x{i}"}})
    return reqs


def answer_problem(req: dict[str, Any], res: dict[str, Any], pods: list[str]) -> str:
    """'' when the answer is the case's: status, attempts the apps saw, the 503
    body of a close, a retry on `flaky` on the other pod."""
    svc, _, _, _, _, status, n = CASES[req["reset"]]
    if (res["status"], len(pods)) != (status, n):
        return f"status/attempts {res['status']}/{len(pods)}, expected {status}/{n}"
    if status == 503 and res["body"] != RESET_BODY:
        return f"503 body {res['body'][:60]!r}"
    if status == 504 and res["body"] != "upstream request timeout":
        return f"504 body {res['body'][:60]!r}"
    lo, hi = TIMES.get(req["reset"], (0.0, 60.0))
    if not lo <= res["secs"] <= hi:
        return f"answered after {res['secs']:.2f} s, expected {lo}-{hi} s"
    if svc == "flaky" and len(pods) >= 2 and pods[0] == pods[1]:
        return f"retried on the same pod: {pods}"
    return ""
