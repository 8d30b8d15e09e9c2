"""`l7fp split --explain` prints matchers and actions by the fields that are set.

Found on a first day with L7FP (docs/first-day.md): each route printed the whole
dataclass repr (every default field, enums as `<PathKind.PREFIX: 'prefix'>`),
300 characters per line that hid the one header the route matches on.
"""

from __future__ import annotations

from fastpath.cli_split import brief
from fastpath.plan import HeaderMatch, PathKind, RouteMatch, StringKind, StringMatch


def test_only_what_is_set() -> None:
    m = RouteMatch(path_kind=PathKind.PREFIX, path="/",
                   headers=(HeaderMatch(name="x-canary", match=StringMatch(kind=StringKind.EXACT,
                                                                           value="true")),))
    assert brief(m) == ("RouteMatch(path_kind=prefix, path='/', headers=[HeaderMatch("
                        "name='x-canary', match=StringMatch(kind=exact, value='true'))])")
    assert brief(RouteMatch(path_kind=PathKind.EXACT, path="/a", case_sensitive=False)) == \
        "RouteMatch(path_kind=exact, path='/a', case_sensitive=False)"
