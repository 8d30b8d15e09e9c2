"""Deadline cases of the retry test: route timeouts and per-try timeouts together
with retries (fastpath/deadline.py), and what Envoy does with them.

Used by test_retry_onoff.py (the `envoy` variant's mesh sends these requests
after its own, fast path off and on: the `/d` routes of policies.yaml) and by
test_deadline_envoy.py (the same routes on one plain Envoy). `flaky` has a 1 s
route timeout plus Istio's default retry policy (Envoy: one deadline over all
attempts and backoffs), `solo` a 600 ms per-try timeout (Envoy: each attempt's
timer, until its response starts; under Istio's retry_on a per-try timeout is
not retried).
"""

from __future__ import annotations

from typing import Any

# (service, headers, status, attempts, (min s, max s) of the answer)
CASES: list[tuple[str, dict[str, str], int, int, tuple[float, float]]] = [
    # the retry's own attempt does not restart the deadline: 503 at 0.6 s, the
    # retry is slow, 504 at 1 s
    ("flaky", {"x-fail": "1", "x-delays": "600,3000"}, 504, 2, (0.9, 1.7)),
    ("flaky", {"x-fail": "1"}, 200, 2, (0.0, 0.9)),
    ("flaky", {"x-delays": "1500"}, 504, 1, (0.9, 1.7)),  # during the first attempt
    ("flaky", {"x-fail": "2", "x-delays": "200,200,200"}, 200, 3, (0.55, 0.99)),
    # per-try: the slow attempt gets 504 at 0.6 s and is not retried
    ("solo", {"x-delays": "1500"}, 504, 1, (0.5, 1.3)),
    ("solo", {"x-fail": "1", "x-delays": "100,1500"}, 504, 2, (0.65, 1.5)),
    # each attempt its own 600 ms: 2 x 350 ms is fine
    ("solo", {"x-fail": "1", "x-delays": "350,350"}, 200, 2, (0.65, 1.5)),
    # the response started in time: Envoy ignores the per-try timer after that
    ("solo", {"x-body-delay-ms": "1200"}, 200, 1, (1.1, 2.5)),
]
TIMEOUT_MS = {"flaky": 1000, "solo": 600}
N_504 = sum(1 for c in CASES if c[2] == 504)


def gen_requests() -> list[dict[str, Any]]:
    reqs = []
    for i, (svc, hdrs, *_) in enumerate(CASES):
        port = 9000 if svc == "flaky" else 9100
        reqs.append({"svc": svc, "vip": svc, "port": port, "method": "GET", "path": f"/d{i}",
                     "headers": {"host": f"{svc}:{port}", **hdrs, "x-k3-id": f"d{i}"},
                     "body": "", "deadline": i})
    return reqs


def answer_problem(req: dict[str, Any], res: dict[str, Any], attempts: int) -> str:
    """'' when the answer is the case's: status, Envoy's 504 body, the number of
    attempts the apps saw, the answer time within generous bounds."""
    _, _, status, n, (lo, hi) = CASES[req["deadline"]]
    if (res["status"], attempts) != (status, n):
        return f"status/attempts {res['status']}/{attempts}, expected {status}/{n}"
    if not lo <= res["secs"] <= hi:
        return f"answered after {res['secs']:.2f} s, expected {lo}-{hi} s"
    if status == 504 and res["body"] != "upstream request timeout":
        return f"504 body {res['body'][:60]!r}"
    return ""


def follows_envoy(attempts: list[tuple[int, str]], svc: str) -> str:
    """'' when the attempts' (arrival ns, x-envoy-expected-rq-timeout-ms) follow
    Envoy's rule (FilterUtility::setTimeoutHeaders): the first attempt the
    route (or per-try) timeout, each retry the per-try timeout again, or the
    route time left: value + time since the first attempt arrived ~= the route
    timeout (the first attempt's arrival stands for the end of the request, a
    retry's arrival for the moment its header was computed: -60..+25 ms off on
    a loaded machine)."""
    first_ms, per_try = TIMEOUT_MS[svc], svc == "solo"
    t1 = attempts[0][0]
    for at, val in attempts:
        if val == "-":
            return f"no header: {attempts}"
        got = int(val)
        if per_try and got != first_ms:
            return f"per-try {got} != {first_ms}: {attempts}"
        if not per_try and not -60 <= got + (at - t1) / 1e6 - first_ms <= 25:
            return f"{got} ms with {(at - t1) / 1e6:.0f} ms gone: {attempts}"
    return ""
