"""Retry policies -> plan.RetryPolicy and the verdict (fastpath.classify_route)."""

from __future__ import annotations

from fastpath.classify import max_retries
from fastpath.classify_route import KernelCaps, retry_policy
from fastpath.plan import RetryPolicy
from xds_server.istio.routes import istio_default_retry

ON = KernelCaps(status_retries=True)
OFF = KernelCaps(status_retries=False)


def test_istio_default_policy_is_kernel_with_status_retries() -> None:
    pol, reasons = retry_policy(istio_default_retry(), ON)
    assert reasons == []
    assert pol == RetryPolicy(
        num_retries=2, retry_on=("cancelled", "connect-failure", "refused-stream",
                                 "retriable-status-codes", "unavailable"),
        status_codes=(503,), grpc_codes=(1, 14), previous_hosts=True,
        host_selection_attempts=5, base_ms=25, max_ms=250)
    _, reasons = retry_policy(istio_default_retry(), OFF)
    assert reasons == ["retry_policy retry_on=cancelled,retriable-status-codes,unavailable can fire"]


def test_conditions_the_data_path_does_not_see_stay_envoy() -> None:
    for cond in ("envoy-ratelimited", "retriable-headers"):
        pol, reasons = retry_policy({"retryOn": cond}, ON)
        assert reasons and cond in reasons[0], cond
        assert pol is not None and pol.num_retries == 1


def test_conditions_with_resets_are_kernel() -> None:
    """5xx (a status class), gateway-error (502-504), reset: the mesh's sidecar
    turns an app's close into a 503 response (fastpath/agent_reset.py)."""
    for cond, codes in (("5xx", (5,)), ("gateway-error", (502, 503, 504)), ("reset", ()),
                        ("5xx,retriable-status-codes", (5, 409)),
                        ("gateway-error,retriable-status-codes", (409, 502, 503, 504))):
        pol, reasons = retry_policy({"retryOn": cond, "retriableStatusCodes": [503, 409]}, ON)
        assert reasons == [], cond
        assert pol is not None and pol.status_codes == codes, (cond, pol)
    _, reasons = retry_policy({"retryOn": "5xx"}, OFF)
    assert reasons == ["retry_policy retry_on=5xx can fire"]


def test_never_firing_and_zero_retries_need_nothing() -> None:
    assert retry_policy({"retryOn": "connect-failure,refused-stream"}, OFF) == (None, [])
    assert retry_policy({"retryOn": "5xx", "numRetries": 0}, OFF) == (None, [])


def test_retriable_4xx_backoff_and_timers() -> None:
    pol, reasons = retry_policy({"retryOn": "retriable-4xx,deadline-exceeded", "numRetries": 3,
                                 "retryBackOff": {"baseInterval": "0.1s"}}, ON)
    assert reasons == []
    assert pol is not None and pol.status_codes == (409,) and pol.grpc_codes == (4,)
    assert (pol.base_ms, pol.max_ms, pol.num_retries) == (100, 1000, 3)
    pol, reasons = retry_policy({"retryOn": "retriable-4xx", "perTryTimeout": "1s"}, ON)
    assert reasons == [] and pol is not None and pol.per_try_timeout_ms == 1000
    _, reasons = retry_policy({"retryOn": "retriable-4xx", "perTryTimeout": "1s"},
                              KernelCaps(route_timeouts=False))
    assert reasons == ["retry per_try_timeout"]
    # the per-try timer rides on a kernel retry: none here, so Envoy
    for p in ({"retryOn": "5xx", "numRetries": 0, "perTryTimeout": "1s"},
              {"retryOn": "connect-failure", "perTryTimeout": "1s"}):
        assert retry_policy(p, ON)[1] == ["retry per_try_timeout without a retry the kernel makes"]
    # a per-try timeout under gateway-error/5xx/reset: the agent retries it
    pol, reasons = retry_policy({"retryOn": "gateway-error", "perTryTimeout": "1s"}, ON)
    assert reasons == [] and pol is not None and pol.per_try_timeout_ms == 1000
    _, reasons = retry_policy({"retryOn": "unavailable", "retriableHeaders": [{"name": "x"}]}, ON)
    assert reasons == ["retry on headers"]


def test_host_predicates() -> None:
    other = {"retryOn": "unavailable", "retryHostPredicate": [
        {"name": "envoy.retry_host_predicates.omit_canary_hosts"}]}
    _, reasons = retry_policy(other, ON)
    assert reasons == ["retry host predicate envoy.retry_host_predicates.omit_canary_hosts"]
    pol, _ = retry_policy({"retryOn": "unavailable", "retryHostPredicate": [
        {"name": "envoy.retry_host_predicates.previous_hosts"}]}, ON)
    assert pol is not None and pol.previous_hosts and pol.host_selection_attempts == 1


def test_cluster_max_retries() -> None:
    assert max_retries({}) == 3
    assert max_retries({"thresholds": [{"maxRetries": 4294967295}]}) == 4294967295
    assert max_retries({"thresholds": [{"priority": "HIGH", "maxRetries": 9}]}) == 3


def test_istio_retry_on_with_resets_is_kernel() -> None:
    """A VirtualService's `retries: {attempts: 3, retryOn: 5xx,connect-failure}`
    as xds_server.istio.routes writes it (istiod's policy, its retryOn replaced)."""
    p = {**istio_default_retry(), "numRetries": 3, "retryOn": "5xx,connect-failure"}
    p.pop("retriableStatusCodes")
    pol, reasons = retry_policy(p, ON)
    assert reasons == [] and pol is not None and pol.status_codes == (5,)
    pol, reasons = retry_policy({**p, "perTryTimeout": "2s"}, ON)  # bookinfo's ratings route
    assert reasons == [] and pol is not None and pol.per_try_timeout_ms == 2000
