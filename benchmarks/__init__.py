"""Benchmark harness: configurations, scenarios, load generators, reports."""
