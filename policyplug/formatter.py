"""`policyplug fmt`: rewrite a policy in canonical layout, keeping every comment.

Layout: top-level statements at column 1, rule and test clauses indented two spaces,
continuation lines four more, one blank line before each rule and test, runs of blanks
and spaces (outside strings) folded to one, a single newline at the end. The result is
checked to parse to the same syntax tree as the input, so `fmt` can never change meaning;
formatting is idempotent (tests check both).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import nodes
from .diagnostics import Diagnostic, DiagnosticSink, Location, PolicyError
from .lexer import TOP_LEVEL_KEYWORDS, LogicalLine, logical_lines
from .parser import parse_text

INDENT = "  "
TEST_LINE_STARTS = frozenset(nodes.EVENT_KINDS) | {"repeat", "expect"}
CONTINUATION = "    "


def _fold_spaces(code: str) -> str:
    """Collapse runs of blanks outside string literals to one space."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(code):
        c = code[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < len(code):
                out.append(code[i + 1])
                i += 2
                continue
            if code.startswith(quote, i):
                out.append(code[i + 1 : i + len(quote)])
                i += len(quote)
                quote = None
                continue
            i += 1
            continue
        if c in "\"'":
            quote = c * 3 if code.startswith(c * 3, i) else c
            out.append(quote)
            i += len(quote)
            continue
        if c in " \t":
            if out and out[-1] != " ":
                out.append(" ")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out).strip()


def _is_top_level(line: LogicalLine) -> bool:
    word = line.first_word
    return word in TOP_LEVEL_KEYWORDS or (word == "on" and line.text.split()[1:2] == ["error"])


def _with_comment(code: str, comment: str | None) -> str:
    return f"{code}  {comment}" if comment and code else (comment or code)


def format_text(text: str, file: str = "<text>") -> str:
    lines, _ = logical_lines(file, text)
    out: list[str] = []
    in_block = False
    in_test = False

    def blank() -> None:
        if out and out[-1] != "":
            out.append("")

    for line in lines:
        top = _is_top_level(line) if line.text else False
        block_head = top and line.first_word in ("rule", "test")
        if block_head or (top and in_block):
            blank()
        elif line.blank_before:
            blank()
        indent = "" if (top or not in_block or not line.text) else INDENT
        if indent and in_test and line.first_word not in TEST_LINE_STARTS:
            indent += CONTINUATION  # a test's event or expect fields continued on another line
        for comment in line.leading_comments:
            if comment == "":
                blank()
            else:
                out.append(indent + comment)
        if not line.text:
            continue
        physical = line.text.split("\n")
        comments = list(line.comments) + [None] * (len(physical) - len(line.comments))
        out.append(_with_comment(indent + _fold_spaces(physical[0]), comments[0]))
        for part, trailing in zip(physical[1:], comments[1:], strict=True):
            folded = _fold_spaces(part)
            if folded or trailing:
                out.append(_with_comment(indent + CONTINUATION + folded if folded else "", trailing))
        if top:
            in_block = block_head
            in_test = line.first_word == "test"
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def _shape(tree: nodes.PolicyFile) -> list[Any]:
    """The syntax tree without locations or comments, to compare meaning."""

    def strip(value: Any) -> Any:
        if isinstance(value, Location):
            return None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return (type(value).__name__,) + tuple(
                strip(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.name not in ("location", "name_location", "kinds_location", "by_location")
            )
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            return " ".join(value.split())  # CEL text: whitespace does not matter
        return value

    return [strip(s) for s in tree.statements if not isinstance(s, nodes.Comment)]


def format_file(text: str, file: str) -> str:
    """Format policy text; raises PolicyError when it does not parse (nothing is rewritten then)."""
    sink = DiagnosticSink()
    before = parse_text(text, file, sink)
    sink.raise_if_failed()
    formatted = format_text(text, file)
    check = DiagnosticSink()
    after = parse_text(formatted, file, check)
    if check.failed or _shape(after) != _shape(before):
        raise PolicyError(
            check.diagnostics
            or [
                Diagnostic(
                    Location(file, 1, 1),
                    "internal error: formatting would change the policy; file left as is",
                )
            ]
        )
    return formatted
