"""Source text -> logical lines.

The rule language is line oriented: a statement or clause is one line, except that a line
ending in `&&`, `||`, `(`, `[`, `,` or inside open brackets continues on the next line.
The lexer strips `#` comments (outside strings), joins continued lines and remembers where
every character came from, so later stages can point at the exact file line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .diagnostics import Location

CONTINUATION_ENDINGS = ("&&", "||", "(", "[", ",", "{")
OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {")", "]", "}"}
# Bracket nesting deeper than this is refused up front: CEL's parser is recursive and a
# hostile file must get a diagnostic, not a RecursionError.
MAX_NESTING = 64


@dataclass(frozen=True, slots=True)
class LogicalLine:
    """One statement or clause: `text` keeps newlines of joined lines so offsets map back."""

    file: str
    text: str
    line: int  # file line of text[0]
    column: int  # file column of text[0]
    comments: tuple[str | None, ...] = ()  # trailing comment of each physical line, for `fmt`
    leading_comments: tuple[str, ...] = ()  # comment lines right above, for `fmt`
    blank_before: bool = False

    def location(self, offset: int, length: int = 1) -> Location:
        """File location of character `offset` of `text`."""
        offset = max(0, min(offset, len(self.text)))
        newlines = self.text.count("\n", 0, offset)
        if newlines == 0:
            return Location(self.file, self.line, self.column + offset, length)
        start_of_line = self.text.rfind("\n", 0, offset) + 1
        return Location(self.file, self.line + newlines, offset - start_of_line + 1, length)

    @property
    def first_word(self) -> str:
        stripped = self.text.lstrip()
        end = 0
        while end < len(stripped) and (stripped[end].isalnum() or stripped[end] == "_"):
            end += 1
        return stripped[:end]


# The words that begin a statement: top-level statements, a rule's clauses, a test's lines.
# The parser (policyplug/parser.py) takes its keyword lists from here.
TOP_LEVEL_KEYWORDS = ("policy", "local", "list", "directory", "define", "include", "default", "rule", "test")
RULE_CLAUSES = (
    "on",
    "when",
    "unless",
    "limit",
    "allow",
    "deny",
    "drop",
    "redirect",
    "route",
    "copy",
    "disclaimer",
    "audit",
    "tag",
)
TEST_CLAUSES = ("expect", "repeat")
STATEMENT_WORDS = frozenset(TOP_LEVEL_KEYWORDS + RULE_CLAUSES + TEST_CLAUSES)


def _starts_statement(text: str) -> bool:
    word = text.split(None, 1)[0] if text else ""
    return word.rstrip(":") in STATEMENT_WORDS and not text.startswith(("(", "[", "{"))


class LexError(Exception):
    def __init__(self, location: Location, message: str):
        super().__init__(message)
        self.location = location
        self.message = message


_SPECIAL = re.compile(r"""[#"'()\[\]{}]""")  # what matters outside a string
_IN_STRING = {'"': re.compile(r'[\\"]'), "'": re.compile(r"[\\']")}  # ... and inside one


def _scan_line(text: str, depth: list[str], in_string: str | None) -> tuple[int, str | None, list[str]]:
    """Scan one physical line; return (comment start or -1, open string quote, bracket stack).

    Strings may not span lines (except CEL triple-quoted ones, which we treat as open). The scan
    jumps from one character that matters to the next (tests/test_lexer.py checks it against a
    character-by-character scan)."""
    i = 0
    n = len(text)
    stack = list(depth)
    quote = in_string
    while i < n:
        if quote:
            match = _IN_STRING[quote[0]].search(text, i)
            if match is None:
                break
            j = match.start()
            if text[j] == "\\":
                i = j + 2
            elif text.startswith(quote, j):
                i = j + len(quote)
                quote = None
            else:
                i = j + 1
            continue
        match = _SPECIAL.search(text, i)
        if match is None:
            break
        j = match.start()
        c = text[j]
        if c == "#":
            return j, None, stack
        if c == '"' or c == "'":
            quote = c * 3 if text.startswith(c * 3, j) else c
            i = j + len(quote)
            continue
        if c in OPENERS:
            stack.append(c)
        elif stack and OPENERS[stack[-1]] == c:
            stack.pop()
        i = j + 1
    if quote and len(quote) == 1:
        quote = None  # an unterminated one-line string: let the parser report it
    return -1, quote, stack


def logical_lines(file: str, text: str) -> tuple[list[LogicalLine], list[LexError]]:
    """Split source text into logical lines, comments removed."""
    physical = text.split("\n")
    result: list[LogicalLine] = []
    errors: list[LexError] = []
    pending_comments: list[str] = []
    blank_before = False
    i = 0
    while i < len(physical):
        raw = physical[i].rstrip("\r")
        comment_at, quote, stack = _scan_line(raw, [], None)
        code = raw if comment_at < 0 else raw[:comment_at]
        trailing = None if comment_at < 0 else raw[comment_at:].rstrip()
        if not code.strip():
            if trailing is not None:
                pending_comments.append(raw.strip())
            else:
                if pending_comments:
                    # a comment block separated from what follows by a blank line stays a
                    # free-standing block: keep it attached but remember the gap
                    pending_comments.append("")
                blank_before = True
            i += 1
            continue
        start_line = i + 1
        indent = len(code) - len(code.lstrip())
        parts = [code[indent:].rstrip()]
        comments: list[str | None] = [trailing]
        while True:
            current = parts[-1].rstrip()
            continues = bool(stack) or quote is not None or current.endswith(CONTINUATION_ENDINGS)
            if len(stack) > MAX_NESTING:
                errors.append(
                    LexError(Location(file, i + 1, 1), f"brackets nest more than {MAX_NESTING} deep")
                )
                stack = []
                quote = None
                continues = False
            if not continues or i + 1 >= len(physical):
                if stack:
                    errors.append(
                        LexError(Location(file, start_line, indent + 1), f"'{stack[-1]}' is never closed")
                    )
                break
            nxt = physical[i + 1].strip()
            if (
                stack
                and not current.endswith(CONTINUATION_ENDINGS)
                and quote is None
                and _starts_statement(nxt)
            ):
                # An unclosed bracket must not swallow the rest of the file: a line that
                # starts like a statement or clause ends the runaway expression.
                errors.append(
                    LexError(Location(file, start_line, indent + 1), f"'{stack[-1]}' is never closed")
                )
                break
            i += 1
            raw = physical[i].rstrip("\r")
            comment_at, quote, stack = _scan_line(raw, stack, quote)
            code = raw if comment_at < 0 else raw[:comment_at]
            comments.append(raw[comment_at:].rstrip() if comment_at >= 0 else None)
            # Keep the physical line whole (with its indentation) so columns map exactly.
            parts.append(code.rstrip())
        joined = "\n".join(parts)
        leading = tuple(c for c in pending_comments)
        while leading and leading[-1] == "":
            leading = leading[:-1]
        result.append(
            LogicalLine(file, joined, start_line, indent + 1, tuple(comments), leading, blank_before)
        )
        pending_comments = []
        blank_before = False
        i += 1
    if pending_comments:
        # comments at the end of the file: an empty logical line carries them for `fmt`
        result.append(LogicalLine(file, "", len(physical), 1, (), tuple(pending_comments), blank_before))
    return result, errors
