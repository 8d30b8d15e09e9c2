"""`l7fp COMMAND --help` explains every option: walks the whole parser tree."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from xds_server.cli import build_parser


def _parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                yield from _parsers(sub)


def test_every_option_has_a_help_text() -> None:
    """`mesh status/exec/logs --name`, `mesh down --backend`, `demo --xds/--fastpath`
    were listed bare."""
    bare = [f"{p.prog} {a.option_strings[-1]}" for p in _parsers(build_parser())
            for a in p._actions if a.option_strings and not a.help]
    assert bare == []


def test_help_texts_are_written_for_users() -> None:
    """`l7fp demo --help` printed its module docstring (`Registered in xds_server/cli.py
    SUBCOMMANDS ...`), a note for developers."""
    for p in _parsers(build_parser()):
        assert "SUBCOMMANDS" not in (p.description or ""), p.prog
