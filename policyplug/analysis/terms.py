"""The z3 terms every part of the analysis shares: constants, strings, and what cannot be modelled.

Its own module so that the encoder (symbolic.py) and the regex translation (regex.py) need not import
each other.
"""

from __future__ import annotations

import z3

Z3_MAX_CHAR = 0x2FFFF  # z3's string alphabet (its default 'unicode' encoding)

TRUE, FALSE = z3.BoolVal(True), z3.BoolVal(False)


class Unsupported(Exception):  # noqa: N818
    """A construct the encoder does not model exactly; the message says which."""


def zstr(text: str) -> z3.SeqRef:
    """A z3 string constant for `text`, exactly (z3 reads `\\u{..}` escapes in its input)."""
    if any(ord(c) > Z3_MAX_CHAR for c in text):
        raise Unsupported("a character beyond the solver's alphabet (above U+2FFFF)")
    return z3.StringVal(text.replace("\\", "\\u{5c}"))
