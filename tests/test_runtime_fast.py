"""The decision hot path (policyplug.runtime.Policy.decide): fused rule matchers, cached parties and
candidate lists, shared obligations, the hand-over to the condition-by-condition walk, the lighter
Decision, and the collector pause while loading. Each must decide exactly as the plain walk does."""

from __future__ import annotations

import gc
import itertools
from bisect import bisect_right
from typing import Any

import pytest

from policyplug import Decision, Event, PolicyError, TraceStep, load_policy
from policyplug import runtime as runtime_module
from policyplug.compiler import compile_policy
from policyplug.limits import MemoryLimiter
from policyplug.loader import load_model

HEAD = 'policy "t"\nlocal domains ["acme.example"]\nlist partners = ["p1.example", "p2.example"]\n'
USERS = [
    "a@acme.example",
    "b@acme.example",
    "c@p1.example",
    "d@p2.example",
    "e@q.example",
    "a@acme.example/phone",
]


def walked(policy: Any, event: Event) -> Decision:
    """The same decision through the condition-by-condition walk over every rule (no index, no matchers)."""
    event._activation_cache = None
    return policy._walk(event, iter(policy.rules), None, None, False, None)


def all_events() -> list[Event]:
    out = []
    for kind, sender, recipient, body in itertools.product(
        ("message", "presence", "call", "file"), USERS, USERS, ("", "secret plan", "x" * 40)
    ):
        out.append(Event._of_kind(kind, sender, recipient, {"body": body}))
    return out


POLICY = (
    HEAD
    + """directory "users.json"
default deny "no"
rule audit_external:
  when direction != "internal"
  audit
  tag "external"
rule copy_partner:
  when recipient.domain in partners
  copy to "archive@acme.example"
  tag "partner"
rule broken_first:
  when sender.attrs.level > 2
  when direction == "internal"
  tag "level"
rule local_only:
  when sender.local && body.contains("secret")
  deny "secret"
rule not_local:
  when !sender.local && size > 30
  drop
rule by_group:
  when "vip" in sender.groups && recipient.domain.endsWith(".example")
  tag "vip"
rule fallback_type:
  when type(size) == type(1) && kind == "call"
  route via "sip:sbc.acme.example"
  allow
rule non_bool:
  when kind == "presence" ? size : false
  allow
rule partner:
  when direction == "outbound" && recipient.domain in partners
  allow
rule internal:
  when direction == "internal"
  allow
"""
)


@pytest.fixture()
def policy_text(tmp_path: Any) -> tuple[str, Any]:
    (tmp_path / "users.json").write_text('{"a@acme.example": {"groups": ["vip"], "level": 5}}')
    return POLICY, tmp_path


def test_fast_path_decides_as_the_walk_does(policy_text: tuple[str, Any]) -> None:
    text, base = policy_text
    model = load_model(text=text, base_dir=base)
    indexed, plain = compile_policy(model), compile_policy(model, use_index=False)
    assert indexed._index is not None and plain._index is None
    assert [r.name for r in indexed.rules if r.match is None] == ["fallback_type"]  # type() is not compiled
    seen_errors = seen_obligations = 0
    for event in all_events():
        event._activation_cache = None
        a = indexed.decide(event)
        event._activation_cache = None
        b = plain.decide(event)
        c = walked(indexed, event)
        assert a == b == c, event
        assert a.to_json() == c.to_json()
        seen_errors += bool(a.errors)
        seen_obligations += bool(a.tags)
    assert seen_errors and seen_obligations


def test_decisions_do_not_share_their_lists(policy_text: tuple[str, Any]) -> None:
    text, base = policy_text
    policy = load_policy(text=text, base_dir=base)
    first = policy.decide(Event.message("a@acme.example", "x@p1.example"))
    second = policy.decide(Event.message("a@acme.example", "x@p1.example"))
    assert first.tags == ["external", "partner", "vip"] and first.copy_to == ["archive@acme.example"]
    first.tags.append("mine")
    first.copy_to.clear()
    assert second.tags == ["external", "partner", "vip"] and second.copy_to == ["archive@acme.example"]
    assert policy.decide(Event.message("a@acme.example", "x@p1.example")).tags == [
        "external",
        "partner",
        "vip",
    ]


def test_activation_after_a_decision_is_the_full_activation(policy_text: tuple[str, Any]) -> None:
    text, base = policy_text
    policy = load_policy(text=text, base_dir=base)
    event = Event.message("A@ACME.example/phone", "x@p1.example", body="hi")
    policy.decide(event)
    activation = policy.activation(event)
    assert activation["direction"] == "outbound"
    assert activation["sender"]["address"] == "a@acme.example" and activation["sender"]["groups"] == ["vip"]
    assert activation["sender"]["resource"] == "phone" and activation["body"] == "hi"
    assert policy.activation(event) is activation
    event._activation_cache = None
    assert policy.activation(event) == activation


def test_a_guard_in_a_later_when_does_not_hide_an_error_in_an_earlier_one() -> None:
    policy = load_policy(
        text=HEAD + "default allow\nrule r:\n  when sender.attrs.level > 0\n"
        '  when direction == "internal"\n  deny\n'
    )
    decision = policy.decide(Event.message("x@p1.example", "a@acme.example"))
    assert decision.decision == "allow" and [e["rule"] for e in decision.errors] == ["r"]
    # ... but a guard-only first `when` lets the index use the second one too
    policy = load_policy(
        text=HEAD + 'default allow\nrule r:\n  when direction == "inbound"\n'
        '  when recipient.domain == "acme.example"\n  deny\n'
    )
    plan = policy._index.plans["message"]
    assert not plan["outbound"][0] and not plan["outbound"][1]
    assert policy.decide(Event.message("x@p1.example", "a@acme.example")).decision == "deny"


def test_local_flags_restrict_directions_in_the_index() -> None:
    policy = load_policy(text=HEAD + "default allow\nrule r:\n  when !sender.local && size > 3\n  deny\n")
    plans = policy._index.plans["message"]
    assert [d for d, (unguarded, _) in plans.items() if unguarded] == ["inbound", "transit"]


def test_caches_overflowing_keep_decisions_exact(policy_text: tuple[str, Any], monkeypatch: Any) -> None:
    text, base = policy_text
    monkeypatch.setattr(runtime_module, "PARTY_CACHE_LIMIT", 3)
    monkeypatch.setattr(runtime_module, "SELECTION_CACHE_LIMIT", 2)
    policy = load_policy(text=text, base_dir=base)
    reference = compile_policy(policy.model, use_index=False)
    for event in all_events() * 2:
        event._activation_cache = None
        got = policy.decide(event)
        assert got == walked(reference, event)
    assert len(policy._parties) <= 3


def test_limits_and_explain_still_walk(policy_text: tuple[str, Any]) -> None:
    policy = load_policy(
        text=HEAD + 'default allow\nrule first:\n  when direction == "internal"\n  tag "t"\n'
        "rule flood:\n  limit 2 per second by sender\n  drop\n"
    )
    limiter = MemoryLimiter()
    event = Event.message("a@acme.example", "b@acme.example")
    outcomes = [policy.decide(event, now=t, limiter=limiter) for t in (0.0, 0.1, 0.2)]
    assert [d.decision for d in outcomes] == ["allow", "allow", "drop"] and outcomes[2].tags == ["t"]
    explained = policy.decide(event, explain=True, now=5.0, limiter=limiter)
    assert [s.rule for s in explained.trace] == ["first", "flood"] and isinstance(
        explained.trace[0], TraceStep
    )


@pytest.mark.parametrize(
    "key",
    [
        "sender",
        "recipient",
        "sender.domain",
        "recipient . user",
        "sender.resource",
        "sender.address",
        "sender.domain + recipient.domain",
        "kind",
    ],
)
def test_limits_keyed_by_a_party_count_exactly_as_the_walk_does(key: str) -> None:
    """decide() counts `by sender` / `by recipient.domain` ... reading the key off the party (no
    activation); every other key goes through the walk. Both must count the same windows."""
    text = (
        HEAD + 'default allow\nrule first:\n  when direction == "internal"\n  tag "t"\n'
        f'rule flood:\n  on message\n  when body != "exempt"\n  limit 3 per minute by {key}\n  drop\n'
        'rule after:\n  when size > 35\n  deny "big"\n'
    )
    policy = load_policy(text=text)
    assert (policy.rules[1].limit.party_key is None) == (key in ("sender.domain + recipient.domain", "kind"))
    fast, walk = MemoryLimiter(), MemoryLimiter()
    events = [e for e in all_events() if e.kind in ("message", "presence")]
    drops = 0
    for step, event in enumerate(events * 2):
        now = step * 0.25
        event._activation_cache = None
        got = policy.decide(event, now=now, limiter=fast)
        event._activation_cache = None
        candidates = (
            r for r in policy.rules if r.kinds is None or event.kind in r.kinds
        )  # as the index does
        expected = policy._walk(event, candidates, None, now, False, walk)
        assert got == expected, (key, step, event)
        drops += got.decision == "drop"
    assert drops > 0  # the limit was reached, not only counted
    assert {k: list(v[0]) for k, v in fast._windows.items()} == {
        k: list(v[0]) for k, v in walk._windows.items()
    }


def test_an_empty_limiter_passed_in_is_used_not_the_policys_own() -> None:
    """A MemoryLimiter with no keys yet is falsy (it has a length): `limiter or self.limiter` would send
    the first hit of every caller's limiter to the policy's own one."""
    for key in ("sender", "kind"):  # the party fast path and the walk
        policy = load_policy(
            text=HEAD + f"default allow\nrule flood:\n  limit 1 per minute by {key}\n  drop\n"
        )
        event = Event.message("a@acme.example", "b@acme.example")
        for _ in range(3):
            event._activation_cache = None
            assert policy.decide(event, now=0.0, limiter=MemoryLimiter()).decision == "allow"
        assert len(policy.limiter) == 0


def test_decision_keeps_the_dataclass_interface() -> None:
    d = Decision("allow", "r1")
    assert (d.copy_to, d.disclaimers, d.tags, d.errors, d.trace, d.audit, d.reason) == (
        [],
        [],
        [],
        [],
        [],
        False,
        None,
    )
    e = Decision("allow", "r1", None, None, None, [], [], [], False, [], "", "", [])
    assert d == e and not (d != e) and d != Decision("deny", "r1")
    d.tags = ["x"]
    d.reason = "why"
    assert d.to_json()["tags"] == ["x"] and d.to_json()["reason"] == "why" and d != e
    assert "Decision(decision='allow'" in repr(d) and d.allowed
    with pytest.raises(TypeError):
        hash(d)
    assert set(d.to_json()) == {
        "decision",
        "rule",
        "reason",
        "redirect_to",
        "route_via",
        "copy_to",
        "disclaimers",
        "tags",
        "audit",
        "errors",
        "policy",
        "policy_revision",
    }


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_pauses_the_collector_and_restores_it(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        load_policy(text=HEAD + "default allow\n")
        assert gc.isenabled() is enabled
        with pytest.raises(PolicyError):
            load_policy(text=HEAD + "default allow\nrule r:\n  when nosuch\n  allow\n")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_a_rule_too_big_for_one_function_is_compiled_condition_by_condition() -> None:
    deep = "size > 0"
    for i in range(22):  # 22 nested loops: more than Python's compiler takes in one function
        deep = f"payload.exists(p{i}, {deep})"
    policy = load_policy(
        text=HEAD + f'default deny\nrule deep:\n  when {deep} || kind == "message"\n  allow\n'
        'rule plain:\n  when kind == "call"\n  allow\n'
    )
    assert policy.rules[0].match is None and policy.rules[1].match is not None
    assert [why for _, _, why in policy.fallbacks()] == ["expression too complex to compile (SyntaxError)"]
    assert policy.decide(Event.message("a@acme.example", "b@acme.example", payload=["x"])).rule == "deep"
    assert policy.decide(Event.call("a@acme.example", "b@acme.example")).rule == "plain"


def test_size_guards_prune_by_bucket_and_stay_exact() -> None:
    policy = load_policy(
        text=HEAD + 'default allow\nrule big:\n  when size > 1000 && sender.local\n  deny "big"\n'
        'rule band:\n  when 10 <= size && size < 20\n  tag "band"\n'
        'rule exact:\n  when size == 15 && body.matches("(")\n  drop\n'
    )
    index = policy._index
    assert index.size_points == (10, 15, 16, 20, 1001)
    reference = compile_policy(policy.model, use_index=False)
    for size in (0, 9, 10, 14, 15, 16, 19, 20, 1000, 1001, 2**63 - 1, 2**63, -5, None, "12"):
        event = Event.message("a@acme.example", "b@acme.example", body="x")
        event.size = size
        got = policy.decide(event)
        assert got == walked(reference, event), size
    event = Event.message("a@acme.example", "b@acme.example")
    event.size = 5
    sender, recipient, direction = policy._derived(event)
    # the bucket of a size, as Policy.decide works it out (inline, on the hot path: the one copy)
    assert [
        r.name
        for r in index.candidates(
            "message", direction, sender[0], recipient[0], bisect_right(index.size_points, 5)
        )
    ] == []
    assert [
        r.name
        for r in index.candidates(
            "message", direction, sender[0], recipient[0], bisect_right(index.size_points, 15)
        )
    ] == ["band", "exact"]
    for size, bucket in ((5, 0), (15, 2), (2**63, -1), ("15", -1)):  # decide() fills the slot of its bucket
        event = Event.message("a@acme.example", "b@acme.example")
        event.size = size
        policy.decide(event)
        selections = [found for found in policy._selection["message"].values() if found.__class__ is list]
        assert selections and all(found[bucket] is not None for found in selections), size
