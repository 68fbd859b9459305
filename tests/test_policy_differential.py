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
    'sender.domain in partners',
    'sender.address == "{user}@{domain}" || body.contains("{word}")',
    '"{group}" in sender.groups',
    'kind == "{kind}" && size > {number}',
    'body.matches("{regex}")',
    'recipient.domain in ["{domain}", "partner.example"] && direction != "internal"',
    'sender.attrs.level > {number}',  # errors for users without a level
    'time.getHours("Europe/Berlin") >= {hour}',
    'payload.exists(p, p.startsWith("urn:"))',
    'sender.user.size() > 3 ? recipient.local : !recipient.local',
    '1 / (size - {number}) > 0',  # division by zero for one size
    '!sender.local && size > {number}',  # local flags restrict the direction in the index
    '{number} <= size && size < 40 && recipient.domain == "{domain}"',  # size bounds too
    'size == {number} || size <= 3',
    'recipient.local && (body.contains("{word}") || 1 / (size - {number}) > 0)',
]
EFFECTS = ["allow", 'deny "no {word}"', "drop", 'redirect to "desk@acme.example"', 'tag "t{number}"',
           'copy to "archive@acme.example"', "audit", 'disclaimer "d{number}"']
WORDS = ["x", "secret", "hi"]
REGEXES = ["[0-9]{{3}}", "^hi", "(", "s.c"]


@st.composite
def policies(draw: Any) -> str:
    on_error_deny = draw(st.booleans())
    lines = ['policy "diff"', 'local domains ["acme.example"]', 'list partners = ["partner.example"]',
             'directory "users.json"']
    if on_error_deny:
        lines.append("on error deny")
    lines.append(draw(st.sampled_from(["default allow", 'default deny "default no"', "default drop"])))
    for i in range(draw(st.integers(1, 12))):
        lines.append(f"rule r{i}:")
        if draw(st.booleans()):
            lines.append("  on " + ", ".join(draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True))))
        for clause in draw(st.lists(st.sampled_from(["when", "unless"]), max_size=2)):
            template = draw(st.sampled_from(CONDITIONS))
            lines.append(f"  {clause} " + template.format(
                direction=draw(st.sampled_from(["internal", "outbound", "inbound", "transit"])),
                domain=draw(st.sampled_from(DOMAINS)), user=draw(st.sampled_from(USERS)),
                word=draw(st.sampled_from(WORDS)), group=draw(st.sampled_from(["staff", "vip"])),
                kind=draw(st.sampled_from(KINDS)), number=draw(st.integers(0, 60)),
                regex=draw(st.sampled_from(REGEXES)).replace("{{", "{").replace("}}", "}"),
                hour=draw(st.integers(0, 23))))
        effect = draw(st.sampled_from(EFFECTS))
        lines.append("  " + effect.format(word=draw(st.sampled_from(WORDS)), number=draw(st.integers(0, 3))))
    return "\n".join(lines) + "\n"


events = st.builds(
    lambda kind, su, sd, ru, rd, body, size, hour: Event.from_json({
        "kind": kind, "from": f"{su}@{sd}", "to": f"{ru}@{rd}", "body": body, "size": size,
        "time": f"2026-11-24T{hour:02d}:00:00Z", "payload": ["urn:xmpp:jingle:1"] if size % 2 else []}),
    st.sampled_from(KINDS), st.sampled_from(USERS), st.sampled_from(DOMAINS), st.sampled_from(USERS),
    st.sampled_from(DOMAINS), st.sampled_from(["", "hi there", "my secret 123", "x"]),
    st.integers(0, 60), st.integers(0, 23))


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
                return {"decision": "deny", "rule": rule.name, "reason": EVALUATION_ERROR_REASON,
                        "obligations": [m.name for m in matched if m.has_obligations], "errors": errors}
            continue
        if not ok:
            continue
        matched.append(rule)
        if rule.effect is not None:
            return {"decision": rule.effect, "rule": rule.name, "reason": rule.reason,
                    "obligations": [m.name for m in matched if m.has_obligations], "errors": errors}
    return {"decision": policy.default_effect, "rule": None, "reason": policy.default_reason,
            "obligations": [m.name for m in matched if m.has_obligations], "errors": errors}


def engine_view(policy: Policy, event: Event) -> dict[str, Any]:
    decision = policy.decide(event)
    by_name = {r.name: r for r in policy.rules}
    expected_obligation_rules = naive_decide(policy, event)["obligations"]
    copies = [a for name in expected_obligation_rules for a in by_name[name].copy_to]
    tags = [t for name in expected_obligation_rules for t in by_name[name].tags]
    assert decision.copy_to == list(dict.fromkeys(copies))
    assert decision.tags == list(dict.fromkeys(tags))
    return {"decision": decision.decision, "rule": decision.rule, "reason": decision.reason,
            "obligations": expected_obligation_rules, "errors": [e["rule"] for e in decision.errors]}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies(), st.lists(events, min_size=1, max_size=6))
def test_compiled_and_indexed_policy_agrees_with_naive_interpreter(tmp_path_factory: Any, text: str,
                                                                   sample: list[Event]) -> None:
    base = tmp_path_factory.getbasetemp()
    (base / "users.json").write_text('{"alice@acme.example": {"groups": ["staff"], "level": 5},'
                                     ' "bob@partner.example": {"groups": ["vip"]}}')
    policy = load_policy(text=text, base_dir=base)
    for event in sample:
        event._activation_cache = None
        assert engine_view(policy, event) == naive_decide(policy, event), text
