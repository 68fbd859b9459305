"""RE2 patterns -> z3 regular expressions, for the part of RE2 whose meaning is plain.

CEL's `matches` is RE2's unanchored search on the text's UTF-8 form (policyplug.cel.functions).
Translated here: literals and escapes, `.`, classes `[...]` with ranges and negation, `\\d \\w \\s`
and their negations (ASCII, as RE2 has them), groups, `|`, `* + ? {n} {n,} {n,m}` (greedy or
lazy: the same language), `^` at the very start and `$` at the very end. Anything else (flags,
Unicode classes, anchors inside, backreferences...) raises Unsupported, and the condition becomes
an opaque atom: `unknown` with the reason "regular expression ...". A word boundary (`\\b`, `\\B`)
is dropped, which gives an upper bound of the language: a match implies membership in it.
"""

from __future__ import annotations

from typing import Any

import re2
import z3

from ..cel.functions import compile_regex
from .terms import FALSE, Unsupported, zstr

_S = z3.StringSort()
_ALL = z3.AllChar(z3.ReSort(_S))
_ANY = z3.Star(_ALL)
MAX_REPEAT = 1000


def _char(c: str) -> Any:
    return z3.Re(zstr(c))


def _range(lo: str, hi: str) -> Any:
    return z3.Range(zstr(lo), zstr(hi)) if lo != hi else _char(lo)


def _class_of(letter: str) -> list[tuple[str, str]]:
    return {
        "d": [("0", "9")],
        "w": [("0", "9"), ("A", "Z"), ("a", "z"), ("_", "_")],
        "s": [("\t", "\n"), ("\f", "\r"), (" ", " ")],
    }[letter]


def _union(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else z3.Union(*parts)


def _complement_ranges(ranges: list[tuple[str, str]]) -> Any:
    return z3.Intersect(_ALL, z3.Complement(_union([_range(a, b) for a, b in ranges])))


_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0
        self.approximate = False

    def fail(self, what: str) -> Unsupported:
        return Unsupported(f"regular expression {self.p!r}: {what}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> tuple[Any, bool, bool]:
        start = end = False
        if self.peek() == "^":
            start = True
            self.i += 1
        body_end = len(self.p)
        if self.p.endswith("$") and not self.p.endswith("\\$") and len(self.p) > self.i:
            end = True
            body_end -= 1
        self.p = self.p[:body_end]
        regex = self.alternation()
        if self.i != len(self.p):
            raise self.fail(f"unexpected {self.p[self.i]!r}")
        return regex, start, end

    def alternation(self) -> Any:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return _union(branches)

    def sequence(self) -> Any:
        items = []
        while (char := self.peek()) is not None and char not in "|)":
            items.append(self.repeat(self.atom()))
        if not items:
            return z3.Re(zstr(""))
        return items[0] if len(items) == 1 else z3.Concat(*items)

    def repeat(self, item: Any) -> Any:
        while True:
            c = self.peek()
            if c == "*":
                item = z3.Star(item)
            elif c == "+":
                item = z3.Plus(item)
            elif c == "?":
                item = z3.Option(item)
            elif c == "{":
                close = self.p.find("}", self.i)
                spec = self.p[self.i + 1 : close] if close > 0 else ""
                lo_text, comma, hi_text = spec.partition(",")
                if not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
                    raise self.fail("a repetition the analysis does not read")
                lo = int(lo_text)
                hi = int(hi_text) if hi_text else None
                if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
                    raise self.fail("a repetition over 1000")
                self.i = close
                if not comma:
                    item = z3.Loop(item, lo, lo) if lo else z3.Re(zstr(""))
                elif hi is None:
                    item = z3.Concat(z3.Loop(item, lo, lo), z3.Star(item)) if lo else z3.Star(item)
                else:
                    item = z3.Loop(item, lo, hi) if hi else z3.Re(zstr(""))
            else:
                return item
            self.i += 1
            if self.peek() == "?":  # lazy: the same language
                self.i += 1

    def atom(self) -> Any:
        c = self.peek()
        assert c is not None
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.fail("a group with flags or a name")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.i += 1
            return inner
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return z3.Intersect(_ALL, z3.Complement(_char("\n")))
        if c == "\\":
            return self.escape(in_class=False)
        if c in "^$":
            raise self.fail("an anchor inside the pattern")
        if c in "*+?{":
            raise self.fail(f"a misplaced {c!r}")
        self.i += 1
        return _char(c)

    def escape(self, in_class: bool) -> Any:
        self.i += 1
        c = self.peek()
        if c is None:
            raise self.fail("a trailing backslash")
        self.i += 1
        if c in "dws":
            return _union([_range(a, b) for a, b in _class_of(c)])
        if c in "DWS":
            return _complement_ranges(_class_of(c.lower()))
        if c in _SIMPLE_ESCAPES:
            return _char(_SIMPLE_ESCAPES[c])
        if c in "bB" and not in_class:
            # a word boundary is no character: dropping it gives a language holding every real
            # match (an upper bound); regex_formula then only lets a match imply it
            self.approximate = True
            return z3.Re(zstr(""))
        if not c.isalnum():
            return _char(c)
        raise self.fail(f"the escape \\{c}")

    def char_class(self) -> Any:
        self.i += 1
        negate = False
        if self.peek() == "^":
            negate = True
            self.i += 1
        ranges: list[Any] = []
        plain: list[tuple[str, str]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("an unclosed class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[" and self.p.startswith("[:", self.i):
                raise self.fail("a POSIX class")
            if c == "\\":
                nxt = self.p[self.i + 1] if self.i + 1 < len(self.p) else ""
                if nxt in "dwsDWS" and nxt:
                    ranges.append(self.escape(in_class=True))
                    continue
                self.i += 1
                if nxt in _SIMPLE_ESCAPES:
                    lo = _SIMPLE_ESCAPES[nxt]
                elif nxt and not nxt.isalnum():
                    lo = nxt
                else:
                    raise self.fail(f"the escape \\{nxt} in a class")
                self.i += 1
            else:
                lo = c
                self.i += 1
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi = self.peek()
                if hi == "\\":
                    raise self.fail("an escaped range end")
                assert hi is not None
                self.i += 1
                if ord(hi) < ord(lo):
                    raise self.fail("a reversed range")
                plain.append((lo, hi))
            else:
                plain.append((lo, lo))
        parts = ranges + [_range(a, b) for a, b in plain]
        union = _union(parts)
        if negate:
            return z3.Intersect(_ALL, z3.Complement(union))
        return union


def regex_formula(pattern: str, text: Any) -> tuple[Any, Any, bool]:
    """(matches, is an error, exact?) for `text.matches(pattern)` with a constant pattern. Not
    exact (word boundaries): the formula is the language of an upper bound, which a match
    implies, not the other way round."""
    compiled = compile_regex(pattern)
    if isinstance(compiled, re2.error):
        return FALSE, z3.BoolVal(True), True  # the condition raises 'match error' at every evaluation
    if any(ord(c) > 0x2FFFF for c in pattern):
        raise Unsupported("regular expression with a character beyond the solver's alphabet")
    parser = _Parser(pattern)
    regex, start, end = parser.parse()
    full = (
        z3.Concat(*([] if start else [_ANY]) + [regex] + ([] if end else [_ANY]))
        if not (start and end)
        else regex
    )
    # RE2 matches the UTF-8 form: a lone surrogate cannot be encoded, and the match raises
    surrogate = z3.InRe(text, z3.Concat(_ANY, z3.Range("\\u{d800}", "\\u{dfff}"), _ANY))
    return z3.InRe(text, full), surrogate, not parser.approximate


def regex_core(pattern: str) -> Any:
    """The pattern's own language, without the search's free text around it (a plain witness
    for a pattern with word boundaries is a text that is exactly one match)."""
    return _Parser(pattern).parse()[0]
