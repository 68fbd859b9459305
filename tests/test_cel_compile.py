"""Unit tests of the CEL compiler: each construct, compiled vs reference vs the expected value."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from celpy.celparser import CELParser

from policyplug.cel import functions as rt
from policyplug.cel.compile import compile_expression
from policyplug.cel.errors import CelEvaluationError
from policyplug.cel.reference import interpret

PARSER = CELParser()
UTC = datetime.UTC
CONSTANTS = {"partners": ("partner.example", "aim.example"), "blocked": ("evil.example",)}


def party(address: str, local: bool, groups: tuple[str, ...] = (), attrs: dict | None = None) -> dict:
    user, domain = address.split("@")
    return {
        "address": address,
        "user": user,
        "domain": domain,
        "resource": "laptop",
        "local": local,
        "groups": list(groups),
        "attrs": attrs or {},
    }


EVENT = {
    "kind": "message",
    "protocol": "xmpp",
    "direction": "outbound",
    "type": "chat",
    "body": "pay 4111 1111 1111 1111 now",
    "subject": "Invoice",
    "size": 120,
    "sender": party(
        "alice@acme.example",
        True,
        ("staff", "sales"),
        {"dept": "Sales", "level": 3, "ratio": 0.5, "tags": ["a", "b"], "vip": True},
    ),
    "recipient": party("dave@partner.example", False),
    "payload": ["jabber:client", "urn:xmpp:receipts"],
    "headers": {"x-a": "1"},
    "client": {"ip": "192.0.2.7", "port": 5222, "secure": True},
    "time": datetime.datetime(2026, 11, 24, 10, 30, 15, 250000, tzinfo=UTC),  # a Tuesday, 11:30 in Berlin
}
ERROR = object()


def both(text: str, event: dict = EVENT) -> tuple[Any, Any, Any]:
    tree = PARSER.parse(text)
    compiled = compile_expression(tree, CONSTANTS)
    assert not compiled.fallback, compiled.fallback_reason
    results = []
    for evaluate in (compiled.evaluate, interpret(tree, CONSTANTS)):
        try:
            results.append(evaluate(event))
        except CelEvaluationError:
            results.append(ERROR)
    return results[0], results[1], compiled


CASES = [
    # literals, lists, maps
    ("1", 1),
    ("-3", -3),
    ("0x1F", 31),
    ("7u", 7),
    ("2.5", 2.5),
    ('"a\\nb"', "a\nb"),
    ("r'\\d'", "\\d"),
    ('b"ab"', b"ab"),
    ("true", True),
    ("null", None),
    ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}),
    ("[]", []),
    ("{}", {}),
    ("[size, 1]", [120, 1]),
    ('{"k": size}.k', 120),
    ('{"k": size}["k"]', 120),
    ('{"k": size}.x', ERROR),
    ('{"a": 1, "a": 2}', ERROR),
    ('{"a": 1/0, "b": size}.b', 120),
    ('{"a": 1/0, "b": size}.a', ERROR),
    ('{"a": 1/0, "b": size}', ERROR),
    # field selection and indexing
    ("sender.domain", "acme.example"),
    ("client.port", 5222),
    ("sender.attrs.dept", "Sales"),
    ("sender.attrs.nope", ERROR),
    ('headers["x-a"]', "1"),
    ('headers["nope"]', ERROR),
    ("payload[1]", "urn:xmpp:receipts"),
    ("payload[5]", ERROR),
    ("payload[-1]", "urn:xmpp:receipts"),
    ("sender.attrs.tags[0]", "a"),
    ("body.x", ERROR),
    # in
    ("recipient.domain in partners", True),
    ("sender.domain in partners", False),
    ('"staff" in sender.groups', True),
    ('"x-a" in headers', True),
    ('"dept" in sender.attrs', True),
    ("1 in partners", ERROR),
    ("1 in [1, 'a']", True),
    ("2 in [1, 'a']", ERROR),
    ('"a" in sender.attrs.tags', True),
    # comparisons, with cel-python's typing (1 == 1.0 is an error, true == 1 is not)
    ('direction == "outbound"', True),
    ('direction != "outbound"', False),
    ("size > 100", True),
    ("size <= 100", False),
    ('"ab" < "b"', True),
    ("1 == 1.0", ERROR),
    ("true == 1", True),
    ("1 == true", ERROR),
    ('"a" == true', False),
    ("1.5 < 2", True),
    ("2 < 1.5", ERROR),
    ("[1] == [1]", True),
    ("[1] == [1.0]", ERROR),
    ("time > timestamp('2026-01-01T00:00:00Z')", True),
    ("sender.attrs.level == 3", True),
    ("sender.attrs.ratio == 0.5", True),
    ("null == null", True),
    # arithmetic: int64/uint64 overflow, truncating division, no float modulus
    ("size + 1", 121),
    ("size - 200", -80),
    ("size * 2", 240),
    ("-7 / 2", -3),
    ("-7 % 3", -1),
    ("size / 0", ERROR),
    ("size % 0", ERROR),
    ("9223372036854775807 + size", ERROR),
    ("-9223372036854775807 - size", ERROR),
    ("-(-9223372036854775807 - 1)", ERROR),
    ("1u - 2u", ERROR),
    ("18446744073709551615u + 1u", ERROR),
    ("3u / 2u", 1),
    ("-1u", ERROR),
    ("1.5 + 1.0", 2.5),
    ("1.0 / 0.0", float("inf")),
    ("5.0 % 2.0", ERROR),
    ("1 + 1.0", ERROR),
    ('"a" + "b"', "ab"),
    ("[1] + [2]", [1, 2]),
    ("true + true", 2),
    ("sender.attrs.level * 2", 6),
    ("sender.attrs.level + 0.5", ERROR),
    ("(1.0 + 0.0) == 1", True),
    # logic: commutative error absorption
    ("1/0 == 1 || true", True),
    ("true || 1/0 == 1", True),
    ("1/0 == 1 && false", False),
    ("false && 1/0 == 1", False),
    ("1/0 == 1 || false", ERROR),
    ("1/0 == 1 && true", ERROR),
    ("1 || false", 1),
    ("1 || true", True),
    ('"a" || "b"', ERROR),
    ("!true", False),
    ("!(1/0 == 1)", ERROR),
    ("!1", ERROR),
    ("sender.attrs.nope == 1 || direction == 'outbound'", True),
    # ternary
    ("size > 100 ? 'big' : 'small'", "big"),
    ("size > 500 ? 'big' : 1/0", ERROR),
    ("true ? 1 : 1/0", 1),
    ("1 ? 2 : 3", ERROR),
    ("(1/0 > 1) ? 1 : 2", ERROR),
    ("false ? [1].map(x, x / 0) : 1", 1),
    # size, has
    ("size(body)", 27),
    ("body.size()", 27),
    ("size(sender.groups)", 2),
    ("size(headers)", 1),
    ("size(null)", 0),
    ("size(1)", ERROR),
    ('size(b"abc")', 3),
    ("has(sender.attrs.dept)", True),
    ("has(sender.attrs.nope)", False),
    ("has(sender.domain)", True),
    ("has(headers.nope)", False),
    ('has({"a": 1/0}.a)', False),
    # strings
    ('body.startsWith("pay")', True),
    ('body.endsWith("now")', True),
    ('body.contains("4111")', True),
    ('("a" + "b").contains("a")', ERROR),
    ('body.matches("(?:[0-9][ -]?){13,16}")', True),
    ('body.matches("^x")', False),
    ('body.matches("(")', ERROR),
    ("body.matches(subject)", False),
    ("sender.attrs.dept.lowerAscii()", "sales"),
    ('"ÄB".lowerAscii()', "Äb"),
    ("subject.upperAscii()", "INVOICE"),
    ('matches(body, "pay")', True),
    ("body.startsWith(1)", ERROR),
    ('"abc"[1]', "b"),
    # timestamps and durations
    ('time.getHours("Europe/Berlin")', 11),
    ("time.getHours()", 10),
    ('time.getHours("+05:30")', 16),
    ('time.getHours("Nope/Zone")', ERROR),
    ('time.getDayOfWeek("Europe/Berlin")', 2),
    ("time.getMinutes()", 30),
    ("time.getSeconds()", 15),
    ("time.getMilliseconds()", 250),
    ("time.getFullYear()", 2026),
    ("time.getMonth()", 10),
    ("time.getDate()", 24),
    ("time.getDayOfMonth()", 23),
    ("time.getDayOfYear()", 327),
    ('time.getHours("Europe/Berlin") >= 8 && time.getHours("Europe/Berlin") < 18', True),
    ('duration("1h30m").getMinutes()', 90),
    ('duration("1h").getHours("UTC")', ERROR),
    ('time + duration("1h") > time', True),
    ('time - timestamp("2026-11-24T00:00:00Z") == duration("10h30m15.25s")', True),
    ('timestamp("2026-11-24T10:30:15.25Z") == time', True),
    ('timestamp("garbage")', ERROR),
    # macros
    ('sender.groups.exists(g, g.startsWith("st"))', True),
    ("sender.groups.all(g, g.size() > 3)", True),
    ('sender.groups.exists_one(g, g == "staff")', True),
    ("[1, 2, 3].map(x, x * 2)", [2, 4, 6]),
    ("[1, 2, 3].filter(x, x > 1)", [2, 3]),
    ('payload.filter(p, p.contains("xmpp"))', ["urn:xmpp:receipts"]),
    ("[1, 0].exists(x, 1/x == 1)", True),
    ("[0, 1].all(x, 1/x == 1)", ERROR),
    ("[0, 1].all(x, 1/x == 5)", False),
    ("[1].map(x, 1/0) == [] || true", ERROR),
    ("[1, 2].all(x, x)", ERROR),
    ("[1].all(x, x)", 1),
    ('"ab".exists(c, c == "a")', True),
    ('headers.exists(k, k == "x-a")', True),
    ("size.exists(x, x)", ERROR),
    ("[1, 0].exists_one(x, x)", True),
    ('sender.groups.exists(body, body == "staff") && body.startsWith("pay")', True),
    ("[[1], [2]].map(x, x.map(y, y + 1))", [[2], [3]]),
    # conversions
    ('int("12") + 1', 13),
    ("double(size)", 120.0),
    ('string(size) + "b"', "120b"),
    ("uint(size)", 120),
    ("int(2.9)", 2),
    ('bool("true")', True),
    ("dyn(size) == 120", True),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_construct(text: str, expected: Any) -> None:
    compiled, reference, _ = both(text)
    if expected is ERROR:
        assert compiled is ERROR and reference is ERROR
    else:
        assert reference == expected and type(reference) is type(expected)
        assert compiled == expected and type(compiled) is type(expected)


def test_error_in_a_deep_or_chain_is_absorbed() -> None:
    # Long chains must not nest try blocks (Python allows 20): && and || capture errors natively.
    text = " || ".join(f"sender.attrs.missing{i} == {i}" for i in range(60)) + " || true"
    result = compile_expression(PARSER.parse(text), CONSTANTS)
    assert not result.fallback and result.evaluate(EVENT) is True
    assert result.python_source is not None and "_lor" in result.python_source
    # cel-python nests the repr of both errors into each new error message (exponential in the
    # chain length), so the reference is only asked about a short chain.
    compiled, reference, _ = both(
        " || ".join(f"sender.attrs.missing{i} == {i}" for i in range(8)) + " || true"
    )
    assert compiled is True and reference is True


def test_cel_python_tree_dump_bug_is_replicated() -> None:
    """cel-python's repr() of some errors raises IndexError, and && / || then fail instead of absorbing."""
    for text in [
        "true || (0) && (true && sender.groups < [])",
        "(0 && []) || 1",
        "0 && (sender.groups < [])",
    ]:
        compiled, reference, _ = both(text)
        assert compiled is ERROR and reference is ERROR, text
    compiled, reference, _ = both("sender.groups < [] || true")
    assert compiled is True and reference is True


def test_a_logic_node_that_can_escape_is_not_short_circuited_past() -> None:
    """`_&&_` of two errors formats both, and one made at `{}.dept` cannot be printed: cel-python
    evaluates both sides of `||` and the IndexError escapes even after `true` (found by the
    differential test; the compiled code short-circuited to true)."""
    for text in [
        'true || ((0 && {}.dept) && ("" == headers.dept))',
        'true && (true) || (0) && ((({}).dept).matches("^a")) && ("" + "" == headers.dept)',
        'false && ((0 && {}.dept) && ("" == headers.dept))',
    ]:
        compiled, reference, _ = both(text)
        assert compiled is ERROR and reference is ERROR, text
    for text in ["true || (0 && {}.dept)", "(0 && {}.dept) && false"]:  # one error: absorbed, no escape
        compiled, reference, _ = both(text)
        assert compiled == reference and type(compiled) is bool, text


def test_typical_conditions_compile_to_plain_python() -> None:
    for text, fragment in [
        ('direction == "outbound"', "_act['direction'] == 'outbound'"),
        ("recipient.domain in partners", "in _set"),
        ('"x" in sender.groups', "in _act['sender']['groups']"),
        ('time.getHours("Europe/Berlin") >= 8', "_loc"),
    ]:
        result = compile_expression(PARSER.parse(text), CONSTANTS)
        assert not result.fallback and fragment in result.python_source, result.python_source
        assert "_g_" not in result.python_source  # no generic (cel-python backed) helper on the hot path


def test_constant_regex_is_compiled_once_at_load() -> None:
    result = compile_expression(PARSER.parse('body.matches("[0-9]{4}")'), CONSTANTS)
    assert "_re" in result.python_source and "_matches" not in result.python_source
    assert result.evaluate(EVENT) is True


def test_local_time_is_cached_per_timestamp() -> None:
    local = rt.LocalTime(rt.timezone_for("Europe/Berlin"))
    first = local(EVENT["time"])
    assert local(EVENT["time"]) is first and first.hour == 11
    later = EVENT["time"] + datetime.timedelta(hours=1)
    assert local(later).hour == 12


@pytest.mark.parametrize(
    ("text", "reason"), [("type(size) == int", "type()"), ("[1, 2].reduce(r, x, 0, r + x) == 3", "reduce")]
)
def test_uncovered_constructs_fall_back_to_the_reference(text: str, reason: str) -> None:
    tree = PARSER.parse(text)
    result = compile_expression(tree, CONSTANTS)
    assert result.fallback and reason in result.fallback_reason and result.python_source is None
    expected = interpret(tree, CONSTANTS)(EVENT)
    assert result.evaluate(EVENT) == expected


def test_activation_outside_the_schema_defers_to_the_reference() -> None:
    tree = PARSER.parse('direction == "outbound" || size > 3')
    result = compile_expression(tree, CONSTANTS)
    event = {
        k: v for k, v in EVENT.items() if k != "direction"
    }  # no such field: cel-python's error, absorbed
    before = rt.deferrals
    assert result.evaluate(event) is True
    assert rt.deferrals == before + 1


def test_unknown_name_is_an_error() -> None:
    compiled, reference, _ = both("nosuchname == 1 || false")
    assert compiled is ERROR and reference is ERROR


def test_defines_substituted_twice_compile() -> None:
    shared = PARSER.parse('time.getHours("Europe/Berlin")').children[0]
    tree = PARSER.parse("1 >= 8 && 1 < 18")
    # put the same subtree object in both places, as the lead's define substitution does
    for relation in tree.find_data("relation"):
        if len(relation.children) == 2:
            relation.children[0].children[0] = shared
    result = compile_expression(tree, CONSTANTS)
    assert not result.fallback and result.evaluate(EVENT) is True


@pytest.mark.parametrize(
    "text",
    [
        '"abc"',
        "'x'",
        '""',
        "''",
        '"é and spaces"',
        "0",
        "7",
        "007",
        "42",
        "999999999999999999",
        "9223372036854775807",
        "true",
        "false",
    ],
)
def test_plain_literals_fold_as_cel_python_folds_them(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding skips cel-python's evaluator for plain literals; the result must be what it gives."""
    from policyplug.cel import compile as compile_module

    literal = next(PARSER.parse(text).find_pred(lambda t: t.data == "literal"))
    fast = compile_module.CodeGenerator({}).fold(literal)
    monkeypatch.setattr(compile_module, "_simple_literal", lambda token: None)
    slow = compile_module.CodeGenerator({}).fold(literal)
    assert (fast.code, fast.type, type(fast.value), fast.value, fast.err, fast.const) == (
        slow.code,
        slow.type,
        type(slow.value),
        slow.value,
        slow.err,
        slow.const,
    )
