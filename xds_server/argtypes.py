"""argparse types shared by the `l7fp` subcommands (the message is argparse's usage
error, exit 2, naming the flag), so a bad value stops before anything starts.

Called by `mesh.cli` (`mesh up --timeout`, `mesh audit --wait/--timeout`) and `mesh.demo`
(`demo --duration/--rate`);
`xds_server.serve.port` is the port type.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number_in(low: float, high: float, low_ok: bool = False) -> Callable[[str], float]:
    """A type for a number in (low, high] (with `low_ok`: [low, high]): seconds, requests/s."""
    above = f">= {low:g}" if low_ok else f"> {low:g}"
    said = f"a number {above}" if high == math.inf else \
        f"a number in {'[' if low_ok else '('}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low <= value if low_ok else low < value) or not value <= high:  # nan too
            raise argparse.ArgumentTypeError(f"{text!r}: expected {said}")
        return value

    return parse


positive = number_in(0, math.inf)
non_negative = number_in(0, math.inf, low_ok=True)
