"""wrk and h2load runners against the real leaf app, and their parsers."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import load
from benchmarks.apps import parse_head

pytestmark = pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("h2load")),
                                reason="wrk/h2load not installed (scripts/setup-host.sh)")


def test_wrk_closed_loop_reports_percentiles_and_cdf(leaf_app: str) -> None:
    res = load.run_wrk(leaf_app, 2, 1)
    assert res.requests > 50 and res.errors == 0
    assert 0 < res.p50_us <= res.p90_us <= res.p99_us
    values = [v for _, v in res.cdf]
    assert values == sorted(values) and len(res.cdf) == len(load.CDF_POINTS)
    assert res.rps == pytest.approx(res.requests / res.duration_s)


def test_wrk_cycles_policy_paths(leaf_app: str) -> None:
    res = load.run_wrk(leaf_app, 1, 1, paths=["/mix11/r0", "/mix11/r1"])
    assert res.requests > 10 and res.errors == 0


def test_h2load_rate_limited_run_paces_requests(leaf_app: str) -> None:
    res = load.run_h2load(leaf_app, 4, 2, rate=200, warmup_s=0.2)
    assert res.errors == 0
    # paced at 200 req/s for 2 s: far fewer than the app could serve closed loop
    assert 200 <= res.requests <= 600
    assert res.offered_rps == 200 and res.p50_us <= res.p99_us


def test_wrk_against_nothing_is_an_error(free_port: int) -> None:
    with pytest.raises(load.LoadError, match="no request|wrk exited"):
        load.run_wrk(f"http://127.0.0.1:{free_port}/", 1, 1)


def test_parse_wrk_needs_the_summary_line() -> None:
    with pytest.raises(load.LoadError, match="L7FP-JSON"):
        load.parse_wrk("Running 1s test @ http://x\n")


def test_parse_h2load_log_counts_errors_and_percentiles() -> None:
    text = "".join(f"{1000 + i}\t{200 if i % 10 else 503}\t{i + 1}\n" for i in range(100))
    res = load.parse_h2load_log(text, 2.0)
    assert res.requests == 100 and res.errors == 10 and res.rps == 50
    assert (res.p50_us, res.p90_us, res.p99_us) == (50, 90, 99)


def test_percentile_nearest_rank() -> None:
    assert load.percentile([5.0], 99) == 5.0
    assert load.percentile([1, 2, 3, 4], 50) == 2.0
    assert load.percentile([1, 2, 3, 4], 100) == 4.0


def test_app_parser_handles_partial_and_body() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nhost: x\r\n") is None
    end, path, length = parse_head(b"POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc")  # type: ignore[misc]
    assert (path, length) == (b"/p", 3) and end == len(b"POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\n")
    with pytest.raises(ValueError, match="bad request line"):
        parse_head(b"NONSENSE\r\n\r\n")
