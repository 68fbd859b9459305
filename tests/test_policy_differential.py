"""Whole policies decided two ways must agree: the engine (compiled conditions + rule index) and a
naive first-match walk over every rule with cel-python's interpreter (the reference)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyplug import Event, load_policy
from policyplug.cel.errors import CelEvaluationError
from policyplug.cel.reference import interpret
from policyplug.runtime import EVALUATION_ERROR_REASON, Policy

DOMAINS = ["acme.example", "partner.example", "other.example", "spam.example"]
USERS = ["alice", "bob", "carol"]
KINDS = ["message", "presence", "subscribe", "call", "file", "login", "groupchat"]
CONDITIONS = [
    'direction == "{direction}"',
    'recipient.domain == "{domain}"',
    "sender.domain in partners",
    'sender.address == "{user}@{domain}" || body.contains("{word}")',
    '"{group}" in sender.groups',
    'kind == "{kind}" && size > {number}',
    'body.matches("{regex}")',
    'recipient.domain in ["{domain}", "partner.example"] && direction != "internal"',
    "sender.attrs.level > {number}",  # errors for users without a level
    'time.getHours("Europe/Berlin") >= {hour}',
    'payload.exists(p, p.startsWith("urn:"))',
    "sender.user.size() > 3 ? recipient.local : !recipient.local",
    "1 / (size - {number}) > 0",  # division by zero for one size
    "!sender.local && size > {number}",  # local flags restrict the direction in the index
    '{number} <= size && size < 40 && recipient.domain == "{domain}"',  # size bounds too
    "size == {number} || size <= 3",
    'recipient.local && (body.contains("{word}") || 1 / (size - {number}) > 0)',
]
EFFECTS = [
    "allow",
    'deny "no {word}"',
    "drop",
    'redirect to "desk@acme.example"',
    'tag "t{number}"',
    'copy to "archive@acme.example"',
    "audit",
    'disclaimer "d{number}"',
]
WORDS = ["x", "secret", "hi"]
REGEXES = ["[0-9]{{3}}", "^hi", "(", "s.c"]


@st.composite
def policies(draw: Any) -> str:
    on_error_deny = draw(st.booleans())
    lines = [
        'policy "diff"',
        'local domains ["acme.example"]',
        'list partners = ["partner.example"]',
        'directory "users.json"',
    ]
    if on_error_deny:
        lines.append("on error deny")
    lines.append(draw(st.sampled_from(["default allow", 'default deny "default no"', "default drop"])))
    for i in range(draw(st.integers(1, 12))):
        lines.append(f"rule r{i}:")
        if draw(st.booleans()):
            lines.append(
                "  on "
                + ", ".join(draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True)))
            )
        for clause in draw(st.lists(st.sampled_from(["when", "unless"]), max_size=2)):
            template = draw(st.sampled_from(CONDITIONS))
            lines.append(
                f"  {clause} "
                + template.format(
                    direction=draw(st.sampled_from(["internal", "outbound", "inbound", "transit"])),
                    domain=draw(st.sampled_from(DOMAINS)),
                    user=draw(st.sampled_from(USERS)),
                    word=draw(st.sampled_from(WORDS)),
                    group=draw(st.sampled_from(["staff", "vip"])),
                    kind=draw(st.sampled_from(KINDS)),
                    number=draw(st.integers(0, 60)),
                    regex=draw(st.sampled_from(REGEXES)).replace("{{", "{").replace("}}", "}"),
                    hour=draw(st.integers(0, 23)),
                )
            )
        effect = draw(st.sampled_from(EFFECTS))
        lines.append("  " + effect.format(word=draw(st.sampled_from(WORDS)), number=draw(st.integers(0, 3))))
    return "\n".join(lines) + "\n"


events = st.builds(
    lambda kind, su, sd, ru, rd, body, size, hour: Event.from_json(
        {
            "kind": kind,
            "from": f"{su}@{sd}",
            "to": f"{ru}@{rd}",
            "body": body,
            "size": size,
            "time": f"2026-11-24T{hour:02d}:00:00Z",
            "payload": ["urn:xmpp:jingle:1"] if size % 2 else [],
        }
    ),
    st.sampled_from(KINDS),
    st.sampled_from(USERS),
    st.sampled_from(DOMAINS),
    st.sampled_from(USERS),
    st.sampled_from(DOMAINS),
    st.sampled_from(["", "hi there", "my secret 123", "x"]),
    st.integers(0, 60),
    st.integers(0, 23),
)


def naive_decide(policy: Policy, event: Event) -> dict[str, Any]:
    """First match over every rule, each condition run by cel-python; same semantics, no index."""
    activation = policy.activation(event)
    matched: list[Any] = []
    errors: list[str] = []
    model = policy.model
    for checked, rule in zip(model.rules, policy.rules, strict=True):
        if rule.kinds is not None and event.kind not in rule.kinds:
            continue
        ok = True
        failed = False
        for tree, expected in [(t, True) for t in checked.when] + [(t, False) for t in checked.unless]:
            try:
                value = interpret(tree, policy.lists)(activation)
            except CelEvaluationError:
                failed = True
                break
            if value is not expected:
                failed = value is not True and value is not False
                ok = False
                break
        if failed:
            errors.append(rule.name)
            if policy.on_error_deny:
                return {
                    "decision": "deny",
                    "rule": rule.name,
                    "reason": EVALUATION_ERROR_REASON,
                    "obligations": [m.name for m in matched if m.has_obligations],
                    "errors": errors,
                }
            continue
        if not ok:
            continue
        matched.append(rule)
        if rule.effect is not None:
            return {
                "decision": rule.effect,
                "rule": rule.name,
                "reason": rule.reason,
                "obligations": [m.name for m in matched if m.has_obligations],
                "errors": errors,
            }
    return {
        "decision": policy.default_effect,
        "rule": None,
        "reason": policy.default_reason,
        "obligations": [m.name for m in matched if m.has_obligations],
        "errors": errors,
    }


def engine_view(policy: Policy, event: Event) -> dict[str, Any]:
    decision = policy.decide(event)
    by_name = {r.name: r for r in policy.rules}
    expected_obligation_rules = naive_decide(policy, event)["obligations"]
    copies = [a for name in expected_obligation_rules for a in by_name[name].copy_to]
    tags = [t for name in expected_obligation_rules for t in by_name[name].tags]
    assert decision.copy_to == list(dict.fromkeys(copies))
    assert decision.tags == list(dict.fromkeys(tags))
    return {
        "decision": decision.decision,
        "rule": decision.rule,
        "reason": decision.reason,
        "obligations": expected_obligation_rules,
        "errors": [e["rule"] for e in decision.errors],
    }


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(policies(), st.lists(events, min_size=1, max_size=6))
def test_compiled_and_indexed_policy_agrees_with_naive_interpreter(
    tmp_path_factory: Any, text: str, sample: list[Event]
) -> None:
    base = tmp_path_factory.getbasetemp()
    (base / "users.json").write_text(
        '{"alice@acme.example": {"groups": ["staff"], "level": 5},'
        ' "bob@partner.example": {"groups": ["vip"]}}'
    )
    policy = load_policy(text=text, base_dir=base)
    for event in sample:
        event._activation_cache = None
        assert engine_view(policy, event) == naive_decide(policy, event), text


# -- the index is exact under `on error deny`, with attributes of any type, on every error path -----

from policyplug.compiler import compile_policy  # noqa: E402
from policyplug.loader import load_model  # noqa: E402

GUARDS = [
    'direction == "{direction}"',
    'recipient.domain == "{domain}"',
    "sender.domain in partners",
    '"staff" in sender.groups',
    "!sender.local",
    "recipient.local",
    "size > {number}",
    'kind == "{kind}"',
    'sender.address == "{user}@{domain}"',
    "{number} <= size",
]
# One per way a CEL condition can fail (cel.functions: Err values that && absorbs, Raised errors of
# map/filter bodies, PyErr of a macro over a non-list, Defer to the reference, the bad_repr of
# `[]`/`{}`), and non-bool results; `level` and `tags` take every JSON type in the directory.
FAILING = [
    "sender.attrs.level.exists(x, x == 1)",
    "sender.attrs.level.all(x, x > 0)",
    "sender.attrs.level.exists_one(x, x == 1)",
    "sender.attrs.level.map(x, x / 0).size() > 0",
    'sender.attrs.tags.filter(x, x > "a").size() > 0',
    "sender.attrs.tags.map(x, x + 1).size() > 1",
    "sender.attrs.level > 2",
    "sender.attrs.level + 1 == 4",
    "sender.attrs.level.size() > 1",
    'sender.attrs.level.startsWith("a")',
    'sender.attrs.level["k"] == 1',
    "sender.attrs.level[0] == 1",
    "has(sender.attrs.level.k)",
    'sender.attrs.level.matches("(")',
    "sender.attrs.level < []",
    "sender.attrs.level == {{}}",
    "sender.attrs.level",
    "!sender.attrs.level",
    "1 / (size - {number}) > 0",
    "int(sender.attrs.level) > 1",
    'string(sender.attrs.level) == "3"',
    "sender.attrs.level in [1, 2, 3]",
    "sender.attrs.nope == 1",
    "bytes(body).exists(x, x == 104)",
    '{{"a": sender.attrs.level / 0}}.size() > 0',
    "(sender.attrs.level ? true : false)",
    "sender.attrs.tags.exists(t, t.size() > 1)",
    'recipient.attrs.level.exists(x, x == "a")',
    "body.matches(sender.attrs.tags[0])",
]
FORMS = [
    "{g} && {e}",
    "{e} && {g}",
    "{g} && ({e} && {g2})",
    "({e} || {e2}) && {g}",
    "{g} && {e} && {g2}",
    "{g} && ({e2} && {e})",
    "{e}",
    "{g} || {e}",
    "{g} && {g2}",
    "({g} && {e}) && ({g2} && {e2})",
]
ODD_VALUES = [3, "3", "abc", [1, 2], [], ["a", "bc"], {"a": 1}, {}, None, True, 1.5, -1, [1, "a", None]]


@st.composite
def error_policies(draw: Any) -> str:
    lines = [
        'policy "diff-errors"',
        'local domains ["acme.example"]',
        'list partners = ["partner.example"]',
        'directory "users.json"',
    ]
    if draw(st.integers(0, 3)):  # mostly `on error deny`: an error decides, so a hidden one shows
        lines.append("on error deny")
    lines.append(draw(st.sampled_from(["default allow", 'default deny "default no"'])))

    def fill(template: str) -> str:
        return template.format(
            direction=draw(st.sampled_from(["internal", "outbound", "inbound", "transit"])),
            domain=draw(st.sampled_from(DOMAINS)),
            user=draw(st.sampled_from(USERS)),
            kind=draw(st.sampled_from(KINDS)),
            number=draw(st.integers(0, 60)),
        )

    for i in range(draw(st.integers(1, 6))):
        lines.append(f"rule r{i}:")
        if draw(st.integers(0, 3)) == 0:
            lines.append(
                "  on "
                + ", ".join(draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True)))
            )
        for clause in ["when"] + draw(st.lists(st.sampled_from(["when", "unless"]), max_size=2)):
            condition = draw(st.sampled_from(FORMS)).format(
                g=fill(draw(st.sampled_from(GUARDS))),
                g2=fill(draw(st.sampled_from(GUARDS))),
                e=fill(draw(st.sampled_from(FAILING))),
                e2=fill(draw(st.sampled_from(FAILING))),
            )
            lines.append(f"  {clause} {condition}")
        lines.append("  " + draw(st.sampled_from(["allow", 'deny "no"', 'tag "t"', "drop"])))
    return "\n".join(lines) + "\n"


directories = st.fixed_dictionaries(
    {
        f"{user}@{domain}": st.fixed_dictionaries(
            {
                "groups": st.sampled_from([[], ["staff"], ["vip", "staff"]]),
                "level": st.sampled_from(ODD_VALUES),
                "tags": st.sampled_from(ODD_VALUES),
            }
        )
        for user, domain in [
            ("alice", "acme.example"),
            ("bob", "partner.example"),
            ("carol", "other.example"),
            ("bob", "acme.example"),
        ]
    }
)


def _view(decision: Any) -> dict[str, Any]:
    return {
        "decision": decision.decision,
        "rule": decision.rule,
        "reason": decision.reason,
        "tags": decision.tags,
        "errors": [e["rule"] for e in decision.errors],
    }


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(error_policies(), directories, st.lists(events, min_size=1, max_size=6))
def test_index_is_exact_on_every_error_path(
    tmp_path_factory: Any, text: str, directory: dict[str, Any], sample: list[Event]
) -> None:
    """Indexed engine, unindexed engine and a naive walk with cel-python decide alike, errors included."""
    import json

    base = tmp_path_factory.mktemp("errors")
    (base / "users.json").write_text(json.dumps(directory))
    model = load_model(text=text, base_dir=base)
    indexed = compile_policy(model)
    unindexed = compile_policy(model, use_index=False)
    for event in sample:
        event._activation_cache = None
        reference = naive_decide(indexed, event)
        event._activation_cache = None
        got = _view(indexed.decide(event))
        event._activation_cache = None
        plain = _view(unindexed.decide(event))
        expected = {key: reference[key] for key in ("decision", "rule", "reason", "errors")}
        assert {k: got[k] for k in expected} == expected, (text, directory, event)
        assert got == plain, (text, directory, event)


def test_issue15_repro_index_keeps_an_error_a_false_guard_cannot_absorb(tmp_path: Any) -> None:
    """`direction == "inbound" && sender.attrs.level.exists(...)` with the int 3: cel-python raises
    past the `&&` (a macro over a non-list), so for an outbound event the rule errs and, with
    `on error deny`, denies; the index must not skip it on the false direction guard."""
    (tmp_path / "users.json").write_text('{"alice@acme.example": {"level": 3}}')
    text = (
        'policy "p"\nlocal domains ["acme.example"]\ndirectory "users.json"\non error deny\ndefault allow\n'
        'rule r:\n  when direction == "inbound" && sender.attrs.level.exists(x, x == 1)\n  deny\n'
    )
    model = load_model(text=text, base_dir=tmp_path)
    event = Event.from_json({"kind": "message", "from": "alice@acme.example", "to": "bob@evil.example"})
    for policy in (compile_policy(model), compile_policy(model, use_index=False)):
        event._activation_cache = None
        decision = policy.decide(event)
        assert decision.decision == "deny" and decision.reason == EVALUATION_ERROR_REASON
        assert [e["rule"] for e in decision.errors] == ["r"]
    assert naive_decide(policy, event)["decision"] == "deny"
