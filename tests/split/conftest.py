"""Fixtures of the split tests (see harness.py)."""

from tests.split.harness import echo_upstreams

__all__ = ["echo_upstreams"]
