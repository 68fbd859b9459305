"""The lexer's line scanner jumps between the characters that matter; it must find exactly what a
character-by-character scan finds (comment start, open string, bracket stack)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policyplug.lexer import CLOSERS, OPENERS, _scan_line


def scan_slowly(text: str, depth: list[str], in_string: str | None) -> tuple[int, str | None, list[str]]:
    i = 0
    n = len(text)
    stack = list(depth)
    quote = in_string
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            i += 1
            continue
        if c == "#":
            return i, None, stack
        if c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote)
            continue
        if c in OPENERS:
            stack.append(c)
        elif c in CLOSERS and stack and OPENERS[stack[-1]] == c:
            stack.pop()
        i += 1
    if quote and len(quote) == 1:
        quote = None
    return -1, quote, stack


@settings(max_examples=3000, deadline=None)
@given(
    st.text(alphabet="ab #\"'\\()[]{}x", max_size=30),
    st.lists(st.sampled_from("([{"), max_size=3),
    st.sampled_from([None, '"', "'", '"""', "'''"]),
)
def test_scan_line_agrees_with_a_character_by_character_scan(
    text: str, depth: list[str], quote: str | None
) -> None:
    assert _scan_line(text, depth, quote) == scan_slowly(text, depth, quote)
