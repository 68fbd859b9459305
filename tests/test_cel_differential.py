"""Differential tests: compiled CEL versus cel-python's interpreter on generated expressions and events.

Hypothesis builds CEL expressions over the event schema (mostly well typed, with a share of
ill-typed operands, overflowing numbers, missing keys and bad regexes so that error paths are
exercised too) and random events; the compiled code and the reference must agree on every
value and on every error-versus-value outcome.
"""

from __future__ import annotations

import datetime
import math
import re
from types import SimpleNamespace
from typing import Any

import pytest
from celpy.celparser import CELParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyplug.cel import functions as rt
from policyplug.cel.compile import compile_expression, compile_rules
from policyplug.cel.errors import CelEvaluationError
from policyplug.cel.reference import interpret

PARSER = CELParser()
CONSTANTS = {"partners": ("partner.example", "aim.example"), "blocked": ("evil.example",), "empty": ()}
UTC = datetime.UTC

# ------------------------------------------------------------------ events

WORDS = [
    "",
    "a",
    "alice",
    "Sales",
    "staff",
    "no-external",
    "acme.example",
    "partner.example",
    "evil.example",
    "x-1",
    "ÄÖü",
    "4111 1111 1111 1111",
    "Hello World",
    "urn:xmpp:jingle:1",
    "10",
    "ab",
]
word = st.sampled_from(WORDS) | st.text(max_size=6)
ATTR_KEYS = ["dept", "level", "ratio", "tags", "flag", "nested", "nothing"]
json_scalar = (
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, 2, -3, 2**63 - 1, -(2**63)])
    | st.integers(-1000, 1000)
    | st.floats(-1e6, 1e6, allow_nan=False)
    | word
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(ATTR_KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def parties(draw: Any) -> dict:
    user = draw(st.sampled_from(["alice", "bob", "dave", "Eve", ""]))
    domain = draw(st.sampled_from(["acme.example", "partner.example", "evil.example", "aim.example"]))
    return {
        "address": f"{user}@{domain}",
        "user": user,
        "domain": domain,
        "resource": draw(st.sampled_from(["", "laptop", "phone"])),
        "local": draw(st.booleans()),
        "groups": draw(st.lists(st.sampled_from(["staff", "no-external", "sales", "admins"]), max_size=3)),
        "attrs": draw(st.dictionaries(st.sampled_from(ATTR_KEYS), json_value, max_size=4)),
    }


@st.composite
def events(draw: Any) -> dict:
    return {
        "kind": draw(st.sampled_from(["message", "presence", "call", "file", "login"])),
        "protocol": draw(st.sampled_from(["xmpp", "sip"])),
        "direction": draw(st.sampled_from(["internal", "outbound", "inbound", "transit"])),
        "type": draw(st.sampled_from(["chat", "normal", "INVITE", ""])),
        "body": draw(word),
        "subject": draw(word),
        "size": draw(st.sampled_from([0, 1, 120, 2**63 - 1]) | st.integers(0, 10**6)),
        "sender": draw(parties()),
        "recipient": draw(parties()),
        "payload": draw(
            st.lists(st.sampled_from(["jabber:client", "urn:xmpp:jingle:1", "text/plain"]), max_size=3)
        ),
        "headers": draw(st.dictionaries(st.sampled_from(["x-a", "user-agent", "subject"]), word, max_size=2)),
        "client": {
            "ip": draw(st.sampled_from(["192.0.2.7", "::1", ""])),
            "port": draw(st.integers(0, 65535)),
            "secure": draw(st.booleans()),
        },
        "time": draw(
            st.datetimes(
                min_value=datetime.datetime(1971, 1, 1),
                max_value=datetime.datetime(2100, 1, 1),
                timezones=st.just(UTC),
            )
        ),
    }


# ------------------------------------------------------------------ expressions
# Sorts: B bool, I int, U uint, D double, S string, L list, M map, T timestamp, R duration, Y bytes, A any.

SORTS = "BIUDSLMTRYA"
STRING_FIELDS = [
    "kind",
    "protocol",
    "direction",
    "type",
    "body",
    "subject",
    "sender.address",
    "sender.domain",
    "sender.user",
    "recipient.domain",
    "recipient.address",
    "recipient.resource",
    "client.ip",
]
STRING_LITS = [
    '""',
    '"a"',
    '"alice"',
    '"Sales"',
    '"staff"',
    '"acme.example"',
    '"partner.example"',
    '"x-1"',
    '"ÄÖü"',
    "'Hello World'",
    '"a\\nb"',
    '"\\u00e9"',
    "r'\\d+'",
    '"10"',
    '"ab"',
]
INT_LITS = ["0", "1", "2", "-3", "7", "100", "9223372036854775807", "-9223372036854775808", "0x1F"]
UINT_LITS = ["0u", "1u", "7u", "18446744073709551615u"]
DOUBLE_LITS = ["0.0", "1.0", "-2.5", "1e3", "0.5", "3.0"]
PATTERNS = ['"^a"', '"(?:[0-9][ -]?){13,16}"', '"[A-Z]"', '"example$"', '"("', '"(?i)sales"', '""', "'a|b'"]
TZS = ['"Europe/Berlin"', '"UTC"', '"America/New_York"', '"+05:30"', '"Nope/Zone"', '""']
TIME_METHODS = [
    "getHours",
    "getDayOfWeek",
    "getMinutes",
    "getSeconds",
    "getFullYear",
    "getMonth",
    "getDayOfMonth",
    "getDate",
    "getDayOfYear",
    "getMilliseconds",
]
MACRO_VARS = ["x", "y", "g", "body"]  # `body` shadows an event field on purpose


def recv(text: str) -> str:
    """A method receiver or index target: parenthesised unless it is a plain name path."""
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", text) else f"({text})"


def _pick(draw: Any, options: list[str]) -> str:
    return options[draw(st.integers(0, len(options) - 1))]


@st.composite
def cel(draw: Any, sort: str = "B", depth: int = 3, scope: tuple[tuple[str, str], ...] = ()) -> str:
    """A CEL expression text of (mostly) the given sort."""
    if sort == "A" or draw(st.integers(0, 11)) == 0:  # now and then an operand of another sort
        sort = _pick(draw, list(SORTS[:-1]))
    bound = [name for name, s in scope if s == sort or s == "A"]
    if bound and draw(st.integers(0, 2)) == 0:
        return _pick(draw, bound)
    leaf = depth <= 0 or draw(st.integers(0, 7)) == 0
    sub = lambda s, d=1: draw(cel(s, depth - d, scope))  # noqa: E731

    if sort == "B":
        if leaf:
            return _pick(
                draw,
                ["true", "false", "sender.local", "client.secure", "recipient.local", "sender.attrs.flag"],
            )
        k = draw(st.integers(0, 15))
        if k == 0:
            return f"{sub('B')} && {sub('B')}"
        if k == 1:
            return f"({sub('B')} || {sub('B')})"
        if k == 2:
            return f"!{sub('B')}"
        if k == 3:
            s = _pick(draw, ["I", "S", "D", "U", "T", "B", "A", "L", "R"])
            op = _pick(draw, ["==", "!=", "<", "<=", ">", ">="])
            return f"{sub(s)} {op} {sub(s if draw(st.booleans()) else _pick(draw, list(SORTS)))}"
        if k == 4:
            container = _pick(
                draw,
                [
                    "partners",
                    "blocked",
                    "empty",
                    "sender.groups",
                    "payload",
                    "headers",
                    "sender.attrs",
                    f"[{sub('S')}, {sub('S')}]",
                    sub("L"),
                    sub("M"),
                    sub("S"),
                ],
            )
            return f"{sub('S')} in {container}"
        if k == 5:
            return f"({sub('B')} ? {sub('B')} : {sub('B')})"
        if k == 6:
            return (
                f"has({_pick(draw, ['sender', 'recipient', 'client', 'headers'])}.{_pick(draw, ATTR_KEYS + ['domain', 'ip', 'groups'])})"
                if draw(st.booleans())
                else f"has(sender.attrs.{_pick(draw, ATTR_KEYS)})"
            )
        if k == 7:
            method = _pick(draw, ["startsWith", "endsWith", "contains"])
            return f"{recv(sub('S'))}.{method}({sub('S')})"
        if k == 8:
            pattern = _pick(draw, PATTERNS) if draw(st.integers(0, 3)) else sub("S")
            return f"{recv(sub('S'))}.matches({pattern})"
        if k in (9, 10):
            return _macro(draw, "B", depth, scope)
        if k == 11:
            return f"{sub('S')} in {_pick(draw, ['partners', 'blocked', 'sender.groups', 'payload'])}"
        if k == 12:
            return f"{sub('S')} == {sub('S')}"
        if k == 13:
            return f"{sub('I')} {_pick(draw, ['<', '>=', '=='])} {sub('I')}"
        if k == 14:
            return f"time.{_pick(draw, TIME_METHODS)}({_pick(draw, TZS)}) {_pick(draw, ['>=', '<', '=='])} {sub('I')}"
        return f"matches({sub('S')}, {_pick(draw, PATTERNS)})"
    if sort == "I":
        if leaf:
            return _pick(draw, INT_LITS + ["size", "client.port", "sender.attrs.level"])
        k = draw(st.integers(0, 8))
        if k == 0:
            return f"({sub('I')} {_pick(draw, ['+', '-', '*', '/', '%'])} {sub('I')})"
        if k == 1:
            return f"-{sub('I')}"
        if k == 2:
            return f"size({sub(_pick(draw, ['S', 'L', 'M', 'Y', 'A']))})"
        if k == 3:
            return f"{recv(sub(_pick(draw, ['S', 'L'])))}.size()"
        if k == 4:
            tz = _pick(draw, TZS) if draw(st.integers(0, 3)) else ""
            return f"{recv(sub('T'))}.{_pick(draw, TIME_METHODS)}({tz})"
        if k == 5:
            return f"int({sub(_pick(draw, ['D', 'S', 'U', 'T']))})"
        if k == 6:
            return f"({sub('B')} ? {sub('I')} : {sub('I')})"
        if k == 7:
            return f"[{sub('I')}, {sub('I')}][{sub('I')}]"
        return f"{recv(sub('R'))}.{_pick(draw, ['getHours', 'getMinutes', 'getSeconds'])}()"
    if sort == "U":
        if leaf:
            return _pick(draw, UINT_LITS)
        k = draw(st.integers(0, 2))
        if k == 0:
            return f"({sub('U')} {_pick(draw, ['+', '-', '*', '/', '%'])} {sub('U')})"
        if k == 1:
            return f"uint({sub('I')})"
        return f"-{sub('U')}"
    if sort == "D":
        if leaf:
            return _pick(draw, DOUBLE_LITS + ["sender.attrs.ratio"])
        k = draw(st.integers(0, 2))
        if k == 0:
            return (
                f"({sub('D')} {_pick(draw, ['+', '-', '*', '/', '%'])} {sub(_pick(draw, ['D', 'D', 'I']))})"
            )
        if k == 1:
            return f"double({sub(_pick(draw, ['I', 'S']))})"
        return f"-{sub('D')}"
    if sort == "S":
        if leaf:
            return _pick(
                draw,
                STRING_LITS
                + STRING_FIELDS
                + [
                    "sender.attrs.dept",
                    'headers["x-a"]',
                    "headers.subject",
                    "payload[0]",
                    "sender.groups[0]",
                ],
            )
        k = draw(st.integers(0, 6))
        if k == 0:
            return f"{sub('S')} + {sub('S')}"
        if k == 1:
            return f"{recv(sub('S'))}.{_pick(draw, ['lowerAscii', 'upperAscii'])}()"
        if k == 2:
            return f"string({sub(_pick(draw, ['I', 'U', 'D', 'S', 'B', 'Y']))})"
        if k == 3:
            return f"({sub('B')} ? {sub('S')} : {sub('S')})"
        if k == 4:
            return f"{recv(sub('L'))}[{sub('I')}]"
        if k == 5:
            return f"{recv(sub('M'))}[{sub('S')}]"
        return f"{recv(sub('M'))}.{_pick(draw, ATTR_KEYS + ['a'])}"
    if sort == "L":
        if leaf:
            return _pick(
                draw,
                [
                    "sender.groups",
                    "payload",
                    "recipient.groups",
                    "partners",
                    "empty",
                    "[]",
                    "sender.attrs.tags",
                    '["a", "staff"]',
                    "[1, 2, 3]",
                ],
            )
        k = draw(st.integers(0, 4))
        if k == 0:
            return f"[{', '.join(sub(_pick(draw, ['S', 'I', 'A'])) for _ in range(draw(st.integers(0, 3))))}]"
        if k in (1, 2):
            return _macro(draw, "L", depth, scope)
        if k == 3:
            return f"{sub('L')} + {sub('L')}"
        return f"({sub('B')} ? {sub('L')} : {sub('L')})"
    if sort == "M":
        if leaf:
            return _pick(
                draw, ["headers", "sender.attrs", "recipient.attrs", "sender.attrs.nested", "client", "{}"]
            )
        n = draw(st.integers(1, 2))
        pairs = ", ".join(f"{sub(_pick(draw, ['S', 'S', 'I', 'B']))}: {sub('A')}" for _ in range(n))
        return "{" + pairs + "}"
    if sort == "T":
        if leaf:
            return _pick(
                draw,
                ["time", 'timestamp("2026-11-24T10:00:00Z")', 'timestamp("1999-12-31T23:59:59.5+01:00")'],
            )
        k = draw(st.integers(0, 2))
        if k == 0:
            return f"{sub('T')} {_pick(draw, ['+', '-'])} {sub('R')}"
        if k == 1:
            return f"timestamp({sub('S')})"
        return f"({sub('B')} ? {sub('T')} : {sub('T')})"
    if sort == "R":
        if leaf:
            return _pick(
                draw, ['duration("1h30m")', 'duration("90s")', 'duration("-2.5h")', 'duration("0s")']
            )
        k = draw(st.integers(0, 2))
        if k == 0:
            return f"{sub('T')} - {sub('T')}"
        if k == 1:
            return f"{sub('R')} {_pick(draw, ['+', '-'])} {sub('R')}"
        return f"duration({sub('S')})"
    if sort == "Y":
        return _pick(draw, ['b"ab"', "b''", 'b"\\x00\\xff"']) if leaf else f"bytes({sub('S')})"
    raise AssertionError(sort)


def _macro(draw: Any, sort: str, depth: int, scope: tuple) -> str:
    var = _pick(draw, MACRO_VARS)
    target_sort = _pick(draw, ["L", "L", "L", "M", "S", "A"])
    target = recv(draw(cel(target_sort, depth - 1, scope)))
    elem = {"L": "S", "M": "S", "S": "S"}.get(target_sort, "A")
    if target == "([1, 2, 3])":
        elem = "I"
    inner = scope + ((var, elem),)
    if sort == "B":
        name = _pick(draw, ["exists", "all", "exists_one"])
        return f"{target}.{name}({var}, {draw(cel('B', depth - 1, inner))})"
    name = _pick(draw, ["map", "filter"])
    body = draw(cel("B" if name == "filter" else _pick(draw, ["S", "I", "B", "A"]), depth - 1, inner))
    return f"{target}.{name}({var}, {body})"


# ------------------------------------------------------------------ comparison


def outcome(evaluate: Any, activation: dict) -> tuple[str, Any]:
    try:
        return "value", evaluate(activation)
    except CelEvaluationError as exc:
        return "error", str(exc)


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (Python's 1 == 1.0 == True must not pass)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            len(a) == len(b)
            and all(any(same_value(k, k2) for k2 in b) for k in a)
            and all(same_value(a[k], b[k]) for k in a)
        )
    if isinstance(a, datetime.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return a == b


def check_agreement(text: str, activations: list[dict]) -> None:
    tree = PARSER.parse(text)
    compiled = compile_expression(tree, CONSTANTS)
    assert not compiled.fallback, f"{text}: unexpected fallback ({compiled.fallback_reason})"
    reference = interpret(tree, CONSTANTS)
    for activation in activations:
        before = rt.deferrals
        got = outcome(compiled.evaluate, activation)
        STATS["deferrals"] += rt.deferrals - before  # only this module's evaluations: other tests defer too
        want = outcome(reference, activation)
        assert got[0] == want[0], (
            f"{text}\ncompiled: {got}\nreference: {want}\n{compiled.python_source}\nevent: {activation}"
        )
        if got[0] == "value":
            assert same_value(got[1], want[1]), (
                f"{text}\ncompiled: {got[1]!r}\nreference: {want[1]!r}\n"
                f"{compiled.python_source}\nevent: {activation}"
            )


STATS = {"evaluations": 0, "deferrals": 0}
DIFF_SETTINGS = settings(
    max_examples=350, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@DIFF_SETTINGS
@given(text=cel("B", 4), activations=st.lists(events(), min_size=1, max_size=3))
def test_conditions_agree_with_reference(text: str, activations: list[dict]) -> None:
    STATS["evaluations"] += len(activations)
    check_agreement(text, activations)


@DIFF_SETTINGS
@given(text=cel("A", 3), activations=st.lists(events(), min_size=1, max_size=2))
def test_values_of_every_sort_agree_with_reference(text: str, activations: list[dict]) -> None:
    STATS["evaluations"] += len(activations)
    check_agreement(text, activations)


# Typed arithmetic whose value decides the outcome. In cel("B", 4) only a few percent of conditions
# compile to an int/uint/double operation, and an error elsewhere or an untaken branch usually hides
# its value: five int helpers replaced by ones returning a constant went unnoticed in 600 examples
# there, and this strategy caught them at once (83 of 1,000).
INT_LEAVES = [
    "size",
    "client.port",
    "sender.attrs.level",
    "0",
    "1",
    "2",
    "-3",
    "7",
    "100",
    "-1",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775807",
    "4611686018427387904",
    "3037000500",
    "(size - 9223372036854775807 - 1)",
    "int(sender.attrs.ratio)",
    "body.size()",
    "payload.size()",
    "time.getHours()",
    "int(body)",
]
UINT_LEAVES = [
    "0u",
    "1u",
    "7u",
    "18446744073709551615u",
    "9223372036854775808u",
    "uint(size)",
    "uint(client.port)",
    "uint(sender.attrs.level)",
]
DOUBLE_LEAVES = [
    "0.0",
    "-0.0",
    "1.5",
    "1e308",
    "-2.5",
    "double(size)",
    "sender.attrs.ratio",
    "double(body)",
    "double(client.port)",
]


def arithmetic(leaf: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "%"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            inner.map(lambda x: f"-{x}"),
            st.tuples(st.sampled_from(["sender.local", "size > 5", "sender.attrs.flag"]), inner, inner).map(
                lambda t: f"({t[0]} ? {t[1]} : {t[2]})"
            ),
        ),
        max_leaves=6,
    )


_NUMBER = st.one_of(
    *(arithmetic(st.sampled_from(leaves)) for leaves in (INT_LEAVES, UINT_LEAVES, DOUBLE_LEAVES)),
    arithmetic(st.sampled_from(INT_LEAVES + UINT_LEAVES + DOUBLE_LEAVES)),
)
# one division or remainder, its exact value shown: truncation toward zero and the remainder's sign
# only show with a negative operand and an inexact quotient, which the recursive strategy rarely meets
# (meets: Hypothesis favours size 0 and port 0, so negative dividends are built to be negative)
_DIVIDENDS = [
    "(-size - 7)",
    "(-client.port - 5)",
    "(0 - sender.attrs.level)",
    "(size + 5)",
    "-9223372036854775807",
]
_DIVISORS = ["2", "-2", "3", "-3", "7", "(size + 2)", "(-client.port - 3)", "sender.attrs.level", "-1"]
_DIVISION = st.one_of(
    st.tuples(st.sampled_from(_DIVIDENDS), st.sampled_from(["/", "%"]), st.sampled_from(_DIVISORS)),
    st.tuples(st.sampled_from(INT_LEAVES), st.sampled_from(["/", "%"]), st.sampled_from(INT_LEAVES)),
    st.tuples(st.sampled_from(UINT_LEAVES), st.sampled_from(["/", "%"]), st.sampled_from(UINT_LEAVES)),
    st.tuples(st.sampled_from(DOUBLE_LEAVES), st.just("/"), st.sampled_from(DOUBLE_LEAVES)),
).map(lambda t: f"string({t[0]} {t[1]} {t[2]})")
ARITHMETIC = st.one_of(
    _DIVISION,
    st.tuples(_NUMBER, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _NUMBER).map(" ".join),
    _NUMBER,
    st.tuples(_NUMBER, st.sampled_from(["||", "&&"]), _NUMBER).map(
        lambda t: f"({t[0]} > 0) {t[1]} ({t[2]} < 0)"
    ),
    _NUMBER.map(lambda x: f"[{x}].map(v, v * 2)"),
    _NUMBER.map(lambda x: f"string({x})"),
)


@DIFF_SETTINGS
@given(text=ARITHMETIC, activations=st.lists(events(), min_size=1, max_size=3))
def test_arithmetic_agrees_with_reference(text: str, activations: list[dict]) -> None:
    STATS["evaluations"] += len(activations)
    check_agreement(text, activations)


@st.composite
def policy_conditions(draw: Any) -> str:
    """What `when` lines look like: a few conditions joined by && and ||, some negated."""
    terms = [draw(cel("B", 2)) for _ in range(draw(st.integers(2, 5)))]
    text = terms[0]
    for term in terms[1:]:
        op = draw(st.sampled_from(["&&", "||"]))
        text = f"{text} {op} {'!' if draw(st.booleans()) else ''}({term})"
    return text


@DIFF_SETTINGS
@given(text=policy_conditions(), activations=st.lists(events(), min_size=1, max_size=3))
def test_policy_like_conditions_agree_with_reference(text: str, activations: list[dict]) -> None:
    STATS["evaluations"] += len(activations)
    check_agreement(text, activations)


RULE_OUTCOMES = {"match": 0, "no match": 0, "look closer": 0}


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    conditions=st.lists(
        st.tuples(st.one_of(policy_conditions(), cel("B", 3), cel("A", 2)), st.booleans()),
        min_size=1,
        max_size=3,
    ),
    activations=st.lists(events(), min_size=1, max_size=3),
)
def test_rule_matchers_agree_with_reference(
    conditions: list[tuple[str, bool]], activations: list[dict]
) -> None:
    """The fused matcher of a rule (compile_rules: all its conditions in one function, reading the
    Event and its parties directly) against the reference run condition by condition: True only
    when every condition gives what it must, False only when one gives the other bool before any
    error, and otherwise None or an exception (the engine then walks the rule condition by condition)."""
    trees = [(PARSER.parse(text), expected) for text, expected in conditions]
    (fused,) = compile_rules([trees], CONSTANTS)
    if fused.matcher is None:
        return  # a condition falls back to cel-python: nothing fused to check
    references = [interpret(tree, CONSTANTS) for tree, _ in trees]
    compiled = [compile_expression(tree, CONSTANTS).evaluate for tree, _ in trees]
    for activation in activations:
        want = "match"
        for reference, (_, expected) in zip(references, trees, strict=True):
            kind, value = outcome(reference, activation)
            if kind == "error" or (value is not True and value is not False):
                want = "look closer"
                break
            if value is not expected:
                want = "no match"
                break
        before = rt.deferrals
        for evaluate in compiled:
            outcome(evaluate, activation)
        deferred = rt.deferrals > before  # a cel-python quirk: the matcher may hand over instead
        event = SimpleNamespace(
            **{k: v for k, v in activation.items() if k not in ("sender", "recipient", "direction")}
        )
        try:
            result = fused.matcher(
                event, activation["sender"], activation["recipient"], activation["direction"]
            )
        except Exception:  # noqa: BLE001 - any exception sends the engine to the walk
            result = None
        got = (
            {True: "match", False: "no match"}.get(result, "look closer")
            if type(result) is bool or result is None
            else "wrong type"
        )
        if want == "look closer":
            assert got == "look closer", (conditions, activation, fused.python_source)
        else:
            assert got == want or (got == "look closer" and deferred), (
                conditions,
                activation,
                fused.python_source,
            )
        RULE_OUTCOMES[want] += 1


def test_compiled_path_is_what_was_tested() -> None:
    """Deferrals to the reference (for cel-python quirks) must stay rare, or the tests above prove little."""
    if STATS["evaluations"] < 100:
        pytest.skip("run together with the differential tests")
    deferred = STATS["deferrals"]
    assert deferred / STATS["evaluations"] < 0.05, (deferred, STATS["evaluations"])
    if sum(RULE_OUTCOMES.values()) >= 100:
        assert all(RULE_OUTCOMES.values()), RULE_OUTCOMES  # fused matchers met all three outcomes


# ------------------------------------------------------------------ the generator reaches every construct

REQUIRED = {
    "literal:int",
    "literal:uint",
    "literal:double",
    "literal:string",
    "literal:bytes",
    "literal:bool",
    "list",
    "map",
    "select",
    "index",
    "in",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "neg",
    "&&",
    "||",
    "!",
    "ternary",
    "size",
    "has",
    "startsWith",
    "endsWith",
    "contains",
    "matches",
    "lowerAscii",
    "timestamp",
    "duration",
    "getHours",
    "getDayOfWeek",
    "getMinutes",
    "getFullYear",
    "exists",
    "all",
    "exists_one",
    "map()",
    "filter",
}
OPS = {
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_in": "in",
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
    "unary_neg": "neg",
    "unary_not": "!",
    "conditionaland": "&&",
    "conditionalor": "||",
    "list_lit": "list",
    "map_lit": "map",
    "member_dot": "select",
    "member_index": "index",
}
LITERALS = {
    "INT_LIT": "int",
    "UINT_LIT": "uint",
    "FLOAT_LIT": "double",
    "STRING_LIT": "string",
    "MLSTRING_LIT": "string",
    "BYTES_LIT": "bytes",
    "BOOL_LIT": "bool",
    "NULL_LIT": "null",
}


def constructs(text: str) -> set[str]:
    found = set()
    for node in PARSER.parse(text).iter_subtrees():
        if node.data in OPS and (
            node.data not in ("conditionaland", "conditionalor") or len(node.children) == 2
        ):
            found.add(OPS[node.data])
        elif node.data == "expr" and len(node.children) == 3:
            found.add("ternary")
        elif node.data == "literal":
            found.add("literal:" + LITERALS[node.children[0].type])
        elif node.data in ("ident_arg", "member_dot_arg"):
            name = str(node.children[0] if node.data == "ident_arg" else node.children[1])
            found.add("map()" if name == "map" else name)
    return found


def test_generator_reaches_every_construct() -> None:
    seen: set[str] = set()

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(text=st.one_of(cel("B", 4), cel("A", 3), policy_conditions()))
    def collect(text: str) -> None:
        seen.update(constructs(text))

    collect()
    assert REQUIRED <= seen, f"never generated: {sorted(REQUIRED - seen)}"
