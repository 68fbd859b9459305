"""policyplug analyze / diff / replay (docs/analysis.md): claims checked against the engine."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from policyplug.analysis.analyze import analyze
from policyplug.analysis.diff import diff
from policyplug.audit.log import AuditWriter
from policyplug.compiler import load_policy
from policyplug.events import EVENT_KINDS, Event

HEAD = """policy "t"
local domains ["acme.example"]
list partners = ["partner.example", "other.example"]
default deny "no"
"""

FINDINGS = (
    HEAD
    + """rule out_partner:
  on message
  when direction == "outbound" && recipient.domain in partners
  allow
rule out_partner_x:
  on message
  when direction == "outbound" && recipient.domain == "partner.example" && body.contains("x")
  allow
rule bad_case:
  when recipient.domain == "Partner.Example"
  deny "x"
rule contra:
  when direction == "inbound" && direction == "outbound"
  allow
rule tagger:
  when sender.local
  tag "local"
rule flagged:
  when body.matches("(?i)^x[0-9]{3}y$")
  deny "x"
rule internal:
  when direction == "internal"
  allow
"""
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyplug", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_analyze_findings_are_what_the_engine_does() -> None:
    policy = load_policy(text=FINDINGS)
    result = analyze(policy)
    kinds = {f.rule: f.kind for f in result.findings}
    assert kinds == {
        "out_partner_x": "shadowed",
        "bad_case": "unsatisfiable",
        "contra": "unsatisfiable",
        "flagged": "unknown",
    }
    shadowed = next(f for f in result.findings if f.rule == "out_partner_x")
    assert shadowed.by == ["out_partner"]
    assert shadowed.witness is not None
    assert policy.decide(Event.from_json(shadowed.witness)).rule == "out_partner"
    unsat = next(f for f in result.findings if f.rule == "bad_case")
    assert "Partner.Example" in (unsat.reason or "") and "normal form" in (unsat.reason or "")
    assert "regular expression" in (next(f for f in result.findings if f.rule == "flagged").reason or "")
    # live rules have witnesses the engine decides by them
    for rule in ("out_partner", "internal"):
        assert policy.decide(Event.from_json(result.live[rule])).rule == rule
    assert "local" in policy.decide(Event.from_json(result.live["tagger"])).tags


def test_redundant_rule_changes_no_outcome() -> None:
    text = (
        HEAD
        + """rule big:
  on file
  when size > 2000 && sender.local
  deny "too large"
rule bigger:
  on file
  when size > 1000
  deny "too large"
rule internal:
  when direction == "internal"
  allow
"""
    )
    kinds = {f.rule: f.kind for f in analyze(load_policy(text=text)).findings}
    assert kinds == {"big": "redundant"}


def test_cli_analyze_exit_statuses_and_json(tmp_path: Path) -> None:
    bad = run("analyze", write(tmp_path, "f.policy", FINDINGS), "--format", "json")
    assert bad.returncode == 1, bad.stderr
    data = json.loads(bad.stdout)
    assert data["policy"] == "t"
    shadowed = next(f for f in data["findings"] if f["kind"] == "shadowed")
    assert set(shadowed) >= {"kind", "rule", "line", "by", "witness"} and shadowed["line"] == 9
    unknown = next(f for f in data["findings"] if f["kind"] == "unknown")
    assert unknown["reason"] and unknown["witness"] is None
    clean = HEAD + 'rule internal:\n  when direction == "internal"\n  allow\n'
    only_unknown = clean + 'rule r:\n  when body.matches("(?i)^x[0-9]{3}y$")\n  deny "x"\n'
    assert run("analyze", write(tmp_path, "c.policy", clean), "--format", "json").returncode == 0
    assert run("analyze", write(tmp_path, "u.policy", only_unknown)).returncode == 0  # unknown alone: 0
    assert run("analyze", write(tmp_path, "x.policy", "rule x:\n")).returncode == 2
    strict = run("check", "--strict", str(tmp_path / "f.policy"))
    assert strict.returncode == 1 and "shadowed" in strict.stderr
    assert run("check", "--strict", str(tmp_path / "c.policy")).returncode == 0


EQUIVALENT = (
    HEAD.replace('["partner.example", "other.example"]', '["other.example", "Partner.example"]')
    + """rule internal:
  when kind != "nothing" && direction == "internal"
  allow
rule out_partner:
  on message
  when recipient.domain in partners && direction == "outbound"
  allow
"""
)
ORIGINAL = (
    HEAD
    + """rule out_partner:
  on message
  when direction == "outbound" && recipient.domain in partners
  allow
rule internal:
  when direction == "internal"
  allow
"""
)


def test_diff_equivalent_and_mutated(tmp_path: Path) -> None:
    old = load_policy(text=ORIGINAL)
    assert diff(old, load_policy(text=EQUIVALENT)).same
    mutated = load_policy(text=ORIGINAL.replace('"other.example"', '"else.example"'))
    result = diff(old, mutated)
    assert not result.same and result.changes
    for change in result.changes:
        event = change["witness"]
        assert old.decide(Event.from_json(event)).to_json()["rule"] == change["old"]["rule"]
        assert mutated.decide(Event.from_json(event)).to_json()["rule"] == change["new"]["rule"]
    domains = {Event.from_json(c["witness"]).recipient.domain for c in result.changes}
    assert domains & {"other.example", "else.example"}
    a, b = write(tmp_path, "a.policy", ORIGINAL), write(tmp_path, "b.policy", EQUIVALENT)
    same = run("diff", a, b, "--format", "json")
    assert same.returncode == 0 and json.loads(same.stdout) == {"same": True, "changes": []}
    m = write(tmp_path, "m.policy", ORIGINAL.replace('"other.example"', '"else.example"'))
    changed = run("diff", a, m, "--format", "json")
    assert changed.returncode == 1
    data = json.loads(changed.stdout)
    assert data["same"] is False and {"witness", "old", "new"} <= set(data["changes"][0])
    assert run("diff", a, write(tmp_path, "bad.policy", "nonsense\n")).returncode == 2


def test_replay_of_a_real_audit_log(tmp_path: Path) -> None:
    """A log written by the AuditWriter as `serve` runs it, with a rotation; replayed under a
    policy that refuses one partner."""
    policy_path = write(tmp_path, "old.policy", ORIGINAL)
    old = load_policy(policy_path)
    log = tmp_path / "audit.jsonl"
    writer = AuditWriter(log, level="all", include_bodies=True, node="test", max_bytes=4000, background=False)
    events = [
        Event.message("alice@acme.example", f"bob@{d}", body="hi", time=None)
        for d in ("partner.example", "other.example", "acme.example", "else.example")
    ] * 5
    for event in events:
        writer.submit(event, old.decide(event))
    writer.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) > 1  # rotated
    new_path = write(tmp_path, "new.policy", ORIGINAL.replace('"other.example"', '"else.example"'))
    out = run("replay", new_path, str(log), "--format", "json")
    assert out.returncode == 1, out.stderr
    data = json.loads(out.stdout)
    assert data["events"] == 20
    assert data["changed"] == 10  # other.example now refused, else.example now allowed
    assert data["hits"] == {"out_partner": 10, "internal": 5, "default": 5}
    assert data["never_hit"] == []
    assert {s["old"]["rule"] for s in data["samples"]} == {"out_partner", None}
    same = run("replay", policy_path, str(log), "--format", "json")
    assert same.returncode == 0 and json.loads(same.stdout)["changed"] == 0
    assert run("replay", policy_path, str(tmp_path / "missing.jsonl")).returncode == 2


# -- random policies: claims never contradicted by the engine ---------------------------------------

ATOMS = [
    'direction == "outbound"',
    'direction == "internal"',
    'direction == "inbound"',
    'direction != "transit"',
    'recipient.domain == "partner.example"',
    "recipient.domain in partners",
    "sender.local",
    'body.contains("secret")',
    'body.startsWith("x")',
    "size > 100",
    "size <= 50",
    'kind == "message"',
    'sender.domain.endsWith(".example")',
    '"g" in sender.groups',
    "sender.attrs.level >= 2",
    'body.matches("[0-9]{4}")',
    'recipient.user == "bob"',
]
DOMAINS = ["acme.example", "partner.example", "other.example", "x.example"]


def random_policy(rng: random.Random) -> str:
    lines = [
        HEAD.rstrip("\n").replace('default deny "no"', rng.choice(['default deny "no"', "default allow"]))
    ]
    for i in range(rng.randint(3, 7)):
        atoms = rng.sample(ATOMS, rng.randint(1, 3))
        joiner = rng.choice([" && ", " || "])
        cond = joiner.join(("!" if rng.random() < 0.2 else "") + f"({a})" for a in atoms)
        lines += [f"rule r{i}:"]
        if rng.random() < 0.4:
            lines.append("  on " + ", ".join(rng.sample(["message", "file", "call", "presence"], 2)))
        lines.append(f"  when {cond}")
        lines.append(rng.choice(["  allow", '  deny "d"', '  tag "t"', "  drop", '  deny "e"\n  audit']))
    return "\n".join(lines) + "\n"


def random_events(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        out.append(
            {
                "kind": rng.choice(EVENT_KINDS),
                "from": f"{rng.choice(['alice', 'bob'])}@{rng.choice(DOMAINS)}",
                "to": f"{rng.choice(['alice', 'bob'])}@{rng.choice(DOMAINS)}",
                "body": rng.choice(["", "secret", "x1234", "hello", "xsecret 5555"]),
                "size": rng.choice([0, 10, 60, 101, 5000]),
                "time": "2026-11-24T10:00:00Z",
            }
        )
    return out


def decisions_differ(a: object, b: object, data: dict) -> bool:
    da, db = a.decide(Event.from_json(data)), b.decide(Event.from_json(data))  # type: ignore[attr-defined]
    return (da.decision, da.rule, da.reason, set(da.tags), da.audit) != (
        db.decision,
        db.rule,
        db.reason,
        set(db.tags),
        db.audit,
    )


def rewritten(text: str, rng: random.Random) -> str:
    """The same policy spelt differently: `a && b` as `b && a`, list entries reordered and
    re-cased, adjacent rules for disjoint kinds swapped."""
    text = text.replace('["partner.example", "other.example"]', '["Other.Example", "partner.example"]')
    out = []
    for line in text.split("\n"):
        if line.startswith("  when ") and " && " in line and " || " not in line:
            atoms = line[len("  when ") :].split(" && ")
            line = "  when " + " && ".join(reversed(atoms))
        out.append(line)
    blocks = "\n".join(out).split("\nrule ")
    head, rules = blocks[0], ["rule " + b for b in blocks[1:]]
    for i in range(len(rules) - 1):
        a, b = rules[i], rules[i + 1]
        kinds_a = set(a.split("  on ")[1].split("\n")[0].split(", ")) if "  on " in a else None
        kinds_b = set(b.split("  on ")[1].split("\n")[0].split(", ")) if "  on " in b else None
        if kinds_a is not None and kinds_b is not None and not kinds_a & kinds_b and rng.random() < 0.7:
            rules[i], rules[i + 1] = b, a
    return "\n".join([head, *rules]).rstrip("\n") + "\n"


def mutated(text: str, rng: random.Random) -> str:
    choices = [
        ("size > 100", "size > 99"),
        ('"partner.example"', '"else.example"'),
        ('"secret"', '"secrets"'),
        ("allow", 'deny "m"'),
        ('deny "d"', "allow"),
        ('"internal"', '"transit"'),
    ]
    present = [c for c in choices if c[0] in text]
    old, new = rng.choice(present)
    return text.replace(old, new, 1)


def check_random_policy(seed: int) -> None:
    rng = random.Random(seed)
    text = random_policy(rng)
    if rng.random() < 0.5:
        text = text.replace("default", "on error deny\ndefault", 1)
    policy = load_policy(text=text)
    result = analyze(policy)
    dead = {f.rule for f in result.findings if f.kind in ("shadowed", "unsatisfiable")}
    redundant = {f.rule for f in result.findings if f.kind == "redundant"}
    events = (
        random_events(rng, 300)
        + list(result.live.values())
        + [f.witness for f in result.findings if f.witness]
    )
    other = load_policy(text=mutated(text, rng))
    changes = diff(policy, other)
    events += [c["witness"] for c in changes.changes]
    for data in events:
        decision = policy.decide(Event.from_json(data), explain=True)
        matched = {step.rule for step in decision.trace or [] if step.matched}
        assert not (matched & dead), (text, data, decision.to_json())
    for rule in redundant:  # removing it changes no outcome of any of these events
        from policyplug.analysis.witness import decide as engine_decide
        from policyplug.analysis.witness import outcome_only, without_rule

        index = next(r.index for r in policy.rules if r.name == rule)
        smaller = without_rule(policy, index)
        for data in events:
            assert outcome_only(engine_decide(policy, data).decision) == outcome_only(
                engine_decide(smaller, data).decision
            ), (text, rule, data)
    for rule, witness in result.live.items():
        decision = policy.decide(Event.from_json(witness), explain=True)
        assert rule in {step.rule for step in decision.trace or [] if step.matched}, (text, rule, witness)
    # an equivalent spelling: no change; the mutation: found whenever some event shows it
    assert diff(policy, load_policy(text=rewritten(text, rng))).same, (text, rewritten(text, rng))
    if any(decisions_differ(policy, other, data) for data in events):
        assert not changes.same, text
    for change in changes.changes:
        assert decisions_differ(policy, other, change["witness"])


@pytest.mark.parametrize("seed", range(2))
def test_random_policies_claims_hold(seed: int) -> None:
    check_random_policy(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 30))
def test_random_policies_claims_hold_many(seed: int) -> None:
    check_random_policy(seed)


DIRECTORY = {
    "alice@acme.example": {"groups": ["legal"], "level": 3},
    "bob@acme.example": {"groups": ["sales"], "level": "high"},
    "carol@acme.example": {"groups": ["legal", "sales"]},
}
WIDE = """policy "p2"
local domains ["acme.example"]
directory "dir.json"
on error deny
default allow
rule wall:
  when "legal" in sender.groups && "sales" in recipient.groups
  deny "ethical wall"
rule wall_again:
  when "legal" in sender.groups && recipient.address == "carol@acme.example"
  deny "again"
rule level:
  when sender.attrs.level >= 2
  tag "senior"
rule header_rule:
  on call
  when headers["x-prio"] == "high"
  allow
rule payload_rule:
  when "urn:xmpp:jingle:1" in payload && time.getHours() < 6
  deny "night calls"
rule flood:
  when direction == "outbound"
  limit 3 per minute by sender
  deny "slow down"
rule after:
  when direction == "outbound"
  allow
"""


def test_directory_errors_limits_headers_payload_time(tmp_path: Path) -> None:
    """Groups and attributes come from the directory (a missing or mistyped attribute is an
    error, which denies under `on error deny`); headers, payload, getHours and limit rules."""
    (tmp_path / "dir.json").write_text(json.dumps(DIRECTORY), encoding="utf-8")
    policy = load_policy(write(tmp_path, "p.policy", WIDE))
    result = analyze(policy)
    assert {f.rule: f.kind for f in result.findings} == {"wall_again": "shadowed", "after": "redundant"}
    assert next(f for f in result.findings if f.rule == "wall_again").by == ["wall"]
    for rule in ("wall", "level", "header_rule", "payload_rule"):
        decision = policy.decide(Event.from_json(result.live[rule]), explain=True)
        assert rule in {s.rule for s in decision.trace or [] if s.matched}
    # only alice can reach header_rule: everyone else's level errs, and on error deny decides
    assert Event.from_json(result.live["header_rule"]).sender.address == "alice@acme.example"
    assert "flood" in result.live  # a limit rule is live: its witness is decided by it when repeated


def test_local_time_in_a_zone_is_modelled_over_its_offsets() -> None:
    text = (
        HEAD
        + """rule office:
  when time.getHours("Europe/Berlin") >= 8 && time.getHours("Europe/Berlin") < 18
  allow
rule office_again:
  when time.getHours("Europe/Berlin") >= 9 && time.getHours("Europe/Berlin") < 17 && direction == "internal"
  deny "never"
rule impossible:
  when time.getHours("+05:30") > 23
  allow
"""
    )
    policy = load_policy(text=text)
    result = analyze(policy)
    # one offset per zone and event (which one the calendar gives is not modelled)
    assert {f.rule: f.kind for f in result.findings} == {
        "office_again": "shadowed",
        "impossible": "unsatisfiable",
    }
    assert policy.decide(Event.from_json(result.live["office"])).rule == "office"


def test_word_boundaries_are_bounded_and_witnesses_confirmed() -> None:
    """rules/data-loss-prevention.policy: patterns with \\b are modelled by an upper bound; every
    rule is live, shown by an event the engine decides by it."""
    policy = load_policy(Path(__file__).resolve().parent.parent / "rules" / "data-loss-prevention.policy")
    result = analyze(policy)
    assert result.findings == []
    for rule in ("ibans_stay_inside", "card_numbers_stay_inside", "note_internal_card_numbers"):
        decision = policy.decide(Event.from_json(result.live[rule]), explain=True)
        assert rule in {s.rule for s in decision.trace or [] if s.matched}
    # sixteen digits inside a word ("a0000000000000000b") are no card number to the \b pattern:
    # a later rule for them is not shadowed, and must not be claimed so
    text = (
        Path(policy.path).read_text(encoding="utf-8").split("\ntest ")[0]
        + """
rule late_cards:
  on message
  when outbound && body.matches("[0-9]{16}")
  deny "late"
"""
    )
    late_policy = load_policy(text=text)
    late = analyze(late_policy)
    assert [f.kind for f in late.findings if f.rule == "late_cards"] in ([], ["unknown"])
    assert (
        late_policy.decide(Event.message("a@shop.example", "b@x.example", body="a0000000000000000b")).rule
        == "late_cards"
    )
