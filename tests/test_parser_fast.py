"""The statement parser's fast paths (policyplug.parser._fast_*) must give exactly what the
pyparsing grammars give: same nodes, same locations, same diagnostics, on real policies and on
generated lines full of odd spacing, escapes, keyword look-alikes and mistakes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyplug import parser
from policyplug.diagnostics import DiagnosticSink

ROOT = Path(__file__).resolve().parent.parent
FAST = ("_fast_rest", "_fast_names", "_fast_effect", "_fast_block_head")


def both_ways(text: str) -> tuple[Any, Any]:
    """(statements, diagnostics) parsed with the fast paths, and with pyparsing only."""
    results = []
    for fast in (True, False):
        saved = {name: getattr(parser, name) for name in FAST}
        try:
            if not fast:
                for name in FAST:
                    setattr(parser, name, lambda *args: None)
            sink = DiagnosticSink()
            tree = parser.parse_text(text, "p.policy", sink)
            results.append((tree.statements, [(d.location, d.message) for d in sink.diagnostics]))
        finally:
            for name, value in saved.items():
                setattr(parser, name, value)
    return results[0], results[1]


def policy_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.policy") if ".git" not in p.parts)


@pytest.mark.parametrize("path", policy_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_paths_agree_on_policy_files(path: Path) -> None:
    fast, slow = both_ways(path.read_text())
    assert fast == slow


def test_fast_paths_agree_on_the_benchmark_policy() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_engine import make_policy
    finally:
        sys.path.pop(0)
    fast, slow = both_ways(make_policy(200))
    assert fast == slow


SPACE = st.sampled_from(["", " ", "  ", "\t", " \t "])
NAME = st.sampled_from(
    ["r1", "_x", "message", "presence", "call", "Mess", "a$b", "9x", "when", "allow", "x-y", "é"]
)
STRING = st.sampled_from(
    [
        '"a"',
        '""',
        '"x y"',
        '"a\\"b"',
        '"a\\\\b"',
        '"a\\nb"',
        '"unterminated',
        "'single'",
        '"tab\there"',
        '"é"',
    ]
)
WORDS = [
    "rule",
    "test",
    "on",
    "when",
    "unless",
    "allow",
    "deny",
    "drop",
    "audit",
    "tag",
    "disclaimer",
    "copy",
    "redirect",
    "route",
    "to",
    "via",
    "limit",
    "define",
    "list",
]


@st.composite
def clause_lines(draw: Any) -> str:
    pieces = draw(
        st.lists(
            st.one_of(
                st.sampled_from(WORDS),
                NAME,
                STRING,
                st.sampled_from([",", ":", "&&", "(", ")", "==", "!", "$", "x.y"]),
            ),
            min_size=1,
            max_size=5,
        )
    )
    out = ""
    for piece in pieces:
        out += draw(SPACE) + piece
    return out + draw(SPACE)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(clause_lines(), min_size=1, max_size=6), NAME)
def test_fast_paths_agree_on_generated_lines(lines: list[str], name: str) -> None:
    text = 'policy "p"\ndefault deny\n' + f"rule {name}:\n" + "".join(f"  {line}\n" for line in lines)
    fast, slow = both_ways(text)
    assert fast == slow, text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(WORDS),
            SPACE,
            st.one_of(NAME, STRING),
            SPACE,
            st.sampled_from(["", ":", ",", ", call", " x", '"s"']),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fast_paths_agree_on_near_misses(parts: list[tuple[str, str, str, str, str]]) -> None:
    text = 'policy "p"\ndefault deny\nrule r:\n' + "".join(f"  {a}{b}{c}{d}{e}\n" for a, b, c, d, e in parts)
    fast, slow = both_ways(text)
    assert fast == slow, text
