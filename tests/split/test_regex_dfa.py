"""The route-regex DFA accepts exactly what a full regex match accepts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.regex_dfa import RegexUnsupported, compile_dfa, dfa_full_match

PATTERNS = [r"/a/[0-9]+", r"/(a|b)/.*", r"/a[b-c]?", r"/[^/]+/b", r"^/v[12]/users/\d{1,3}$",
            r"/x(yz)*", r"/api/(v1|v2)/[a-z_]+(/.*)?", r"/[A-Za-z]{2,4}", r"/a.*b.*c", r"/\w+\.json"]
TEXT = st.text(alphabet="/abcxyz0129AZ_.j-sonvuer", max_size=16).map(lambda s: "/" + s)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_dfa_equals_full_match(pattern: str, text: str) -> None:
    dfa = compile_dfa(pattern)
    assert dfa_full_match(dfa, text) == (re.fullmatch(pattern, text) is not None)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_known_members(pattern: str) -> None:
    dfa = compile_dfa(pattern)
    samples = {r"/a/[0-9]+": "/a/42", r"/(a|b)/.*": "/b/x", r"/a[b-c]?": "/ac", r"/[^/]+/b": "/zz/b",
               r"^/v[12]/users/\d{1,3}$": "/v2/users/7", r"/x(yz)*": "/xyzyz",
               r"/api/(v1|v2)/[a-z_]+(/.*)?": "/api/v1/users/9", r"/[A-Za-z]{2,4}": "/AbC",
               r"/a.*b.*c": "/a1b2c", r"/\w+\.json": "/a_1.json"}
    assert dfa_full_match(dfa, samples[pattern])
    assert not dfa_full_match(dfa, samples[pattern] + "\n")
    assert dfa_full_match(dfa, "/é") is None  # non-ASCII: the kernel hands it to Envoy


@pytest.mark.parametrize("pattern,why", [
    (r"(a)\1", "groupref"), (r"/a(?=b)", "inline flags or special groups"), (r"(?i)/a", "inline"),
    (r"/a\b", "construct at"), (r"/[a-z]{1,500}", "repeat count"), (r"/(a|b)*a(a|b){7}", "states"),
])
def test_refused(pattern: str, why: str) -> None:
    with pytest.raises(RegexUnsupported, match=why):
        compile_dfa(pattern)
