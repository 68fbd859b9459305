"""policyplug.cel.fastparse must build exactly the trees cel-python's lark parser builds (rule
names, token types, values and positions, meta) whenever it accepts an expression, and must give
up on everything lark would reject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lark
from celpy.celparser import CELParseError, CELParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyplug.cel import fastparse
from policyplug.diagnostics import DiagnosticSink
from policyplug.parser import parse_text
from tests.test_cel_differential import cel

PARSER = CELParser()
ROOT = Path(__file__).resolve().parent.parent
TOKEN_FIELDS = ("type", "value", "start_pos", "line", "column", "end_line", "end_column", "end_pos")


def shape(node: Any) -> Any:
    """Everything observable of a lark tree, positions and meta included."""
    if isinstance(node, lark.Tree):
        return (
            repr(node.data),
            type(node.data).__name__,
            dict(vars(node.meta)),
            [shape(child) for child in node.children],
        )
    return (type(node).__name__,) + tuple(getattr(node, f) for f in TOKEN_FIELDS)


def lark_shape(text: str) -> Any:
    try:
        return shape(PARSER.parse(text))
    except (CELParseError, lark.exceptions.LarkError, RecursionError):
        return "error"


def check(text: str) -> bool:
    """True when the fast parser took the expression (and then agreed)."""
    fast = fastparse.parse(text)
    if fast is None:
        return False
    assert shape(fast) == lark_shape(text), text
    return True


def test_typical_conditions_are_taken_and_agree() -> None:
    texts = [
        'direction == "outbound" && recipient.domain == "p1.example" && size < 100000',
        "sender.domain in blocked || recipient.domain in blocked",
        '"quarantine" in recipient.groups',
        'sender.address == "user2@acme.example" && body.contains("confidential")',
        'recipient.domain == "p3.example" && time.getHours() >= 6',
        'body.matches("[0-9]{16}")',
        '!sender.local && (kind == "call" || kind == "file")',
        "recipient.domain in ['a.example', 'b.example'] && payload.exists(p, p.startsWith('urn:'))",
        'size * 2 + 1 > 10 % 3 && sender.attrs["level"] / 2 != 1',
        'direction == "outbound" &&\n    recipient.domain in partners',
        "true && !false",
        "f() in [] && g(1, 2)[0] == x.y.z(a)",
        'time.getHours("Europe/Berlin") >= 8 && time.getHours("Europe/Berlin") < 18',
    ]
    for text in texts:
        assert check(text), text


def test_what_it_leaves_to_lark() -> None:
    for text in [
        "x ? 1 : 2",
        '{"a": 1}',
        "size > -1",
        "1.5 < x",
        '"a\\nb"',
        "r'x'",
        'b"x"',
        '"""x"""',
        "x // c",
        "null == x",
        "x in_y",
        "x.true",
        "é == 1",
        "1u",
        "0x1F",
        "x - 1",
        "in == 1",
        "x inx",
        ".x",
        "a.b{c: 1}",
        "x\v== 1",
        "x = 1",
        "x &  y",
        "",
        "(",
        "a b",
        "f(,)",
        "[1,]",
        "'a'b'",
    ]:
        assert fastparse.parse(text) is None, text
        lark_shape(text)  # and lark has its say


def test_conditions_of_the_bundled_policies_agree() -> None:
    taken = total = 0
    for path in sorted(p for p in ROOT.rglob("*.policy") if ".git" not in p.parts):
        sink = DiagnosticSink()
        tree = parse_text(path.read_text(), str(path), sink)
        for statement in tree.statements:
            for expr in [*getattr(statement, "when", []), *getattr(statement, "unless", [])]:
                total += 1
                taken += check(expr.text)
    assert total > 20 and taken > total * 0.8, (taken, total)


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(cel())
def test_generated_expressions_agree(text: str) -> None:
    check(text)


ATOMS = [
    "x",
    "sender.domain",
    "recipient.groups",
    "size",
    "body",
    "true",
    "false",
    "trueish",
    "nullx",
    "in_x",
    "_a1",
    '"p1.example"',
    "'s'",
    '""',
    "0",
    "007",
    "42",
    "[]",
    '["a", "b"]',
    "f()",
    "f(x, 1)",
    "x.y(z)",
    "x[0]",
    "(x)",
    "!x",
    "!!x",
]
OPS = [
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "&&",
    "||",
    "+",
    "*",
    "/",
    "%",
    "!",
    ".",
    ",",
    "(",
    ")",
    "[",
    "]",
    "-",
    "?",
    ":",
    "in_",
    "inx",
]
SPACES = ["", " ", "  ", "\n", "\n  ", "\t", "\r\n", "\f"]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(SPACES), st.sampled_from(ATOMS + OPS)), min_size=1, max_size=9),
    st.sampled_from(SPACES),
)
def test_token_soup_agrees(parts: list[tuple[str, str]], tail: str) -> None:
    check("".join(space + piece for space, piece in parts) + tail)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(ATOMS),
            st.sampled_from(SPACES),
            st.sampled_from(OPS[:10]),
            st.sampled_from(SPACES),
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from(ATOMS),
)
def test_well_formed_chains_agree(parts: list[tuple[str, str, str, str]], last: str) -> None:
    text = "".join(a + s1 + op + s2 for a, s1, op, s2 in parts) + last
    check(text)
