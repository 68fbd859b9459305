"""The engine against the contracts: rule language, decisions, command line, Python API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policyplug import Event, EventError, PolicyError, load_policy
from policyplug.compiler import compile_policy
from policyplug.limits import MemoryLimiter
from policyplug.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT.parent / "shared" / "spec" / "rule-language.md"
ACME = ROOT / "policyplug" / "demo" / "acme" / "acme.policy"
EVENTS = ROOT / "policyplug" / "demo" / "events"

HEAD = 'policy "t"\nlocal domains ["acme.example"]\n'


def run_cli(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyplug", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def policy_of(body: str, **kwargs):  # type: ignore[no-untyped-def]
    return load_policy(text=HEAD + body, **kwargs)


# -- the spec's complete example --------------------------------------------------------------------


def test_bundled_example_is_the_spec_example_verbatim() -> None:
    if not SPEC.exists():
        pytest.skip("shared/spec is not beside the repository")
    example = re.search(r"## A complete example\n\n```\n(.*?)```", SPEC.read_text(), re.S)
    assert example is not None
    assert ACME.read_text() == example.group(1)


def test_spec_example_checks_and_its_tests_pass() -> None:
    check = run_cli("check", str(ACME))
    assert check.returncode == 0, check.stderr
    result = run_cli("test", str(ACME))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "4 passed, 0 failed"


# -- diagnostics ----------------------------------------------------------------------------------------


def test_unknown_name_diagnostic_is_exactly_as_the_spec_shows(tmp_path: Path) -> None:
    path = tmp_path / "acme.policy"
    path.write_text(
        HEAD + 'list partners = ["p.example"]\ndefine outbound = direction == "outbound"\n'
        "default deny\nrule r:\n  when outbound && recipent.domain in partners\n  allow\n"
    )
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert (
        f"{path}:7:20: error: unknown name 'recipent' (did you mean 'recipient'?)\n"
        "    7 |   when outbound && recipent.domain in partners\n"
        "      |                    ^^^^^^^^"
    ) in result.stderr


def test_columns_count_a_tab_as_one_character_and_tabs_in_strings_stay_tabs() -> None:
    """Indentation is free, tabs included: pyparsing must not expand them, or every column after a
    tab is off (and a tab inside a string or a condition turns into spaces)."""
    with pytest.raises(PolicyError) as caught:
        policy_of("default deny\nrule r:\n\twhen\tfoo\n  allow\n")
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.location.line, diagnostic.location.column) == (5, 7)
    assert diagnostic.format().endswith("    5 | \twhen\tfoo\n      | \t    \t^^^")
    with pytest.raises(PolicyError) as caught:
        policy_of(
            'default deny\nrule r:\n  allow\ntest t:\n\tmessage from "a@acme.example" to "b@acme.example"\n'
            "\texpect\tallow by\tnosuch\n"
        )
    assert [(d.location.line, d.location.column) for d in caught.value.diagnostics] == [(8, 18)]
    policy = policy_of('default allow\nrule r:\n\twhen\tbody == "a\tb"\n\tdeny\t"x\ty"\n')
    decision = policy.decide(Event.message("a@acme.example", "b@acme.example", body="a\tb"))
    assert (decision.rule, decision.reason) == ("r", "x\ty")


@pytest.mark.parametrize(
    "name, why",
    [
        ("body", "is a built-in name"),
        ("true", "is a reserved word of CEL"),
        ("null", "is a reserved word of CEL"),
        ("in", "is a reserved word of CEL"),
        ("while", "is a reserved word of CEL"),
        ("string", "is a CEL type name"),
    ],
)
@pytest.mark.parametrize("statement", ['list {} = ["hi"]', 'define {} = body == "hi"'])
def test_a_name_no_condition_could_read_cannot_name_a_list_or_define(
    name: str, why: str, statement: str
) -> None:
    """`list true = [..]` loaded, and `body in true` then read the literal (a TypeError, the rule
    never matched): such names are refused at the name, with the reason."""
    text = HEAD + statement.format(name) + "\ndefault allow\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    (diagnostic,) = caught.value.diagnostics
    kind = statement.split()[0]
    assert diagnostic.message == f"'{name}' {why} and cannot name a {kind}"
    assert (diagnostic.location.line, diagnostic.location.column) == (3, len(kind) + 2)


def test_string_escapes_the_language_defines_and_an_unknown_one_is_an_error() -> None:
    """docs/language.md: strings have \\", \\\\ and \\n escapes (policyplug adds \\t). Any other escape
    is refused at its place (it must not lose its backslash silently: "C:\\files" as "C:files")."""
    policy = policy_of('default deny "a \\"quoted\\" C:\\\\files\\nnext\\tcol"\n')
    assert (
        policy.decide(Event.message("a@acme.example", "b@x.example")).reason
        == 'a "quoted" C:\\files\nnext\tcol'
    )
    for line, column in (
        ('default deny "C:\\files"\n', 17),
        ('default allow\nrule r:\n  allow\n  tag "a\\qb"\n', 9),
        (
            'default allow\ntest t:\n  message from "a@acme.example" to "b@x.example" body "\\d"\n'
            "  expect allow\n",
            56,
        ),
    ):
        with pytest.raises(PolicyError) as caught:
            policy_of(line)
        (diagnostic,) = [d for d in caught.value.diagnostics if "unknown escape '\\" in d.message]
        assert "a backslash itself is \\\\" in diagnostic.message
        assert diagnostic.location.column == column, diagnostic.format()


def test_every_load_time_error_is_reported_in_one_run(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    text = (
        HEAD + 'list partners = file "missing.txt"\n'  # 1 unreadable list file
        'directory "bad.json"\n'  # 2 bad directory
        "rule a:\n  on mesage\n"  # 3 unknown kind
        '  when recipent.domain == "x"\n'  # 4 unknown name
        "  allow\n  deny\n"  # 5 two terminal effects
        "rule a:\n  when sender.domain in partnerz\n  drop\n"  # 6 duplicate rule, 7 unknown list
        "rule c:\n  when (direction == \n  allow\n"  # 8 CEL syntax error
        'test t:\n  message from "a@acme.example" to "b@acme.example"\n  expect allow by nosuch\n'
    )  # 9
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text, base_dir=tmp_path)
    messages = "\n".join(d.message for d in caught.value.diagnostics)
    for fragment in (
        "cannot read list file",
        "not valid JSON",
        "unknown event kind 'mesage'",
        "unknown name 'recipent'",
        "two terminal effects",
        "duplicate rule name 'a'",
        "unknown name 'partnerz'",
        "CEL syntax error",
        "no rule has that name",
        "no 'default' statement",
    ):
        assert fragment in messages, fragment
    assert all(d.location.line >= 1 and d.location.column >= 1 for d in caught.value.diagnostics)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('default deny\nrule r:\n  when sender.domian == "x"\n  allow\n', "'sender' has no field 'domian'"),
        ('default deny\nrule r:\n  when body.lowerascii() == "x"\n  allow\n', "did you mean 'lowerAscii'"),
        ('default deny\nrule r:\n  route via "sip:x.example"\n', "'route via' goes with 'allow'"),
        ("default deny\nrule r:\n  wen true\n  allow\n", "unknown clause 'wen'"),
        ("default deny\ndefault allow\n", "a second 'default'"),
        ("default deny\nrule r:\n  when later\n  allow\ndefine later = true\n", "used before its 'define'"),
        ("default deny\nrule default:\n  allow\n", "reserved"),
        # a count no window can hold is refused at load (else every decision would raise OverflowError)
        (
            "default deny\nrule r:\n  limit 99999999999999999999 per minute by sender\n  drop\n",
            "at most 1,000,000,000",
        ),
    ],
)
def test_more_load_time_checks(body: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(fragment)):
        policy_of(body)


@pytest.mark.parametrize(
    "fields, line_col, fragment",
    [
        ('at "yesterday"', (7, 53), "invalid event: field 'time': not an RFC 3339 time"),
        ('body "x" with {"nope": 1}', (7, 64), "'with' sets 'nope', which is not an event field"),
        ('with {"protocl": "sip"}', (7, 55), "(did you mean 'protocol'?)"),
        ('with {"client": {"prt": 1}}', (7, 55), "'with' sets 'client.prt'"),
        ('with {"client": {"port": "5222"}}', (7, 55), "invalid event: field 'client.port': expected int"),
        ('with {"kind": "mesage"}', (7, 55), "invalid event: field 'kind': unknown kind 'mesage'"),
        ('with {"size": 1 / 0}', (7, 55), "invalid event: with: "),
    ],
)
def test_invalid_test_events_are_load_time_errors_at_the_field(
    fields: str, line_col: tuple[int, int], fragment: str
) -> None:
    """A test whose event can never be built is found by `check`, at the field that is wrong (it used
    to load, and then fail in `policyplug test` as 'decided nothing', saying neither why nor where)."""
    with pytest.raises(PolicyError) as caught:
        policy_of(
            "default deny\nrule r:\n  allow\ntest t:\n"
            f'  message from "a@acme.example" to "b@x.example" {fields}\n  expect allow\n'
        )
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.location.line, diagnostic.location.column) == line_col
    assert diagnostic.message.startswith("test 't': ") and fragment in diagnostic.message


def test_a_repeat_past_the_last_time_is_a_load_time_error() -> None:
    """repeat N adds 1 ms per event: past year 9999 that raised OverflowError in 'policyplug test'."""
    with pytest.raises(PolicyError) as caught:
        policy_of(
            'default deny\ntest t:\n  message from "a@acme.example" to "b@x.example" at "9999-12-31T23:59:59.999Z"\n'
            "  repeat 3\n  expect deny\n"
        )
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.location.line, diagnostic.location.column) == (5, 53)
    assert "'repeat 3' runs past the last time there is" in diagnostic.message
    assert policy_of(
        'default deny\ntest t:\n  message from "a@acme.example" to "b@x.example" at "9999-12-31T23:59:59.997Z"\n'
        "  repeat 3\n  expect deny\n"
    ).tests


def test_invalid_test_addresses_point_at_the_address() -> None:
    with pytest.raises(PolicyError) as caught:
        policy_of(
            'default deny\ntest t:\n  message from "a@acme.example"\n    to "b@@x.example"\n  expect allow\n'
        )
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.location.line, diagnostic.location.column, diagnostic.location.length) == (6, 8, 14)
    assert "invalid event: field 'to'" in diagnostic.message
    valid = policy_of(
        'default deny\ntest t:\n  message from "a@acme.example" to "b@x.example" body "b"\n'
        '    at "2026-11-24T10:00:00Z" with {"protocol": "xmpp", "client": {"ip": "10.1.2.3"}}\n'
        "  expect deny\n"
    )
    assert len(valid.tests) == 1


def test_policy_must_start_with_policy_statement() -> None:
    with pytest.raises(PolicyError, match="must start with 'policy"):
        load_policy(text="default allow\n")


# -- decisions --------------------------------------------------------------------------------------


def test_first_match_with_obligations_kept_for_the_default() -> None:
    policy = policy_of(
        'default deny "no"\n'
        'rule tagger:\n  when direction == "outbound"\n  tag "ext"\n  audit\n  copy to "arc@acme.example"\n'
        'rule disclaim:\n  disclaimer "D"\n'
        "rule never:\n  when false\n  allow\n"
    )
    decision = policy.decide(Event.message("a@acme.example", "b@other.example"))
    assert decision.to_json() | {"policy_revision": None} == {
        "decision": "deny",
        "rule": None,
        "reason": "no",
        "redirect_to": None,
        "route_via": None,
        "copy_to": ["arc@acme.example"],
        "disclaimers": ["D"],
        "tags": ["ext"],
        "audit": True,
        "errors": [],
        "policy": "t",
        "policy_revision": None,
    }
    assert decision.policy_revision.startswith("sha256:") and not decision.allowed


def test_terminal_effects_and_obligations() -> None:
    policy = policy_of(
        "default allow\n"
        'rule r1:\n  on call\n  allow\n  route via "sip:sbc.acme.example"\n'
        'rule r2:\n  on message\n  when body == "x"\n  redirect to "Desk@ACME.example"\n'
        "rule r3:\n  on presence\n  drop\n"
    )
    call = policy.decide(Event.call("sip:a@acme.example", "sip:b@x.example"))
    assert (call.decision, call.rule, call.route_via, call.allowed) == (
        "allow",
        "r1",
        "sip:sbc.acme.example",
        True,
    )
    redirected = policy.decide(Event.message("a@acme.example", "b@acme.example", body="x"))
    assert (redirected.decision, redirected.redirect_to, redirected.allowed) == (
        "redirect",
        "Desk@ACME.example",
        True,
    )
    dropped = policy.decide(Event.presence("a@acme.example", "b@acme.example"))
    assert (dropped.decision, dropped.allowed) == ("drop", False)


@pytest.mark.parametrize(
    "sender, recipient, direction",
    [
        ("a@acme.example", "b@ACME.example", "internal"),
        ("a@acme.example", "b@x.example", "outbound"),
        ("a@x.example", "b@acme.example", "inbound"),
        ("a@x.example", "b@y.example", "transit"),
    ],
)
def test_direction(sender: str, recipient: str, direction: str) -> None:
    policy = policy_of(f'default deny\nrule d:\n  when direction == "{direction}"\n  allow\n')
    assert policy.decide(Event.message(sender, recipient)).rule == "d"


def test_normalised_addresses_reach_rules() -> None:
    policy = policy_of('default deny\nrule alice:\n  when sender.address == "alice@acme.example"\n  allow\n')
    for raw in (
        "Alice@ACME.Example/Laptop",
        "sip:%61lice@acme.example",
        "SIP:ALICE@acme.example:5060;transport=tls",
    ):
        assert policy.decide(Event.message(raw, "bob@acme.example")).rule == "alice", raw


def test_evaluation_error_fails_safe_and_is_recorded() -> None:
    policy = policy_of("default allow\nrule bad:\n  when sender.attrs.missing == 1\n  deny\n")
    decision = policy.decide(Event.message("a@acme.example", "b@acme.example"))
    assert decision.decision == "allow" and decision.rule is None
    assert decision.errors and decision.errors[0]["rule"] == "bad"


def test_on_error_deny() -> None:
    policy = policy_of('on error deny\ndefault allow\nrule bad:\n  when body.matches("(")\n  allow\n')
    decision = policy.decide(Event.message("a@acme.example", "b@acme.example", body="x"))
    assert (decision.decision, decision.reason, decision.rule) == ("deny", "policy evaluation error", "bad")
    assert decision.errors


def test_non_bool_condition_is_an_error() -> None:
    policy = policy_of("default deny\nrule r:\n  when size\n  allow\n")
    decision = policy.decide(Event.message("a@acme.example", "b@acme.example", body="x"))
    assert decision.decision == "deny" and "not a bool" in decision.errors[0]["message"]


def test_cel_type_names_are_known() -> None:
    """Conditions are CEL as cel-python reads it: `type(x) == string` and the other type denotations
    were refused as "unknown name 'string'"."""
    policy = policy_of(
        "default deny\nrule r:\n  when type(kind) == string && type(size) == int && type(payload) == list &&\n"
        "    type(headers) == map && type(client.secure) == bool && type(1u) == uint &&\n"
        '    type(1.5) == double && type(b"x") == bytes && type(null) == null_type\n  allow\n'
        'rule s:\n  when type(size) == string || type == "chat"\n  drop\n'
    )
    decision = policy.decide(Event.message("a@acme.example", "b@x.example", type="chat"))
    assert (decision.rule, decision.errors) == ("r", [])
    assert policy.decide(Event.message("a@acme.example", "b@x.example", body="x")).rule == "r"
    with pytest.raises(PolicyError, match="unknown name 'strin'"):
        policy_of("default deny\nrule r:\n  when type(kind) == strin\n  allow\n")


def test_limit_sliding_window_is_exact() -> None:
    policy = policy_of("default allow\nrule flood:\n  limit 3 per second by sender\n  drop\n")
    event = Event.message("a@acme.example", "b@acme.example")
    limiter = MemoryLimiter()
    times = (0.0, 0.2, 0.4, 0.6, 1.3, 1.5, 1.55)
    outcomes = [policy.decide(event, now=t, limiter=limiter).decision for t in times]
    # the 4th event within one second exceeds 3; at 1.3 only 0.4 and 0.6 are left in (0.3, 1.3];
    # at 1.5 the window holds 0.6, 1.3, 1.5 (three: allowed); 1.55 makes four
    assert outcomes == ["allow", "allow", "allow", "drop", "allow", "allow", "drop"]
    other = Event.message("c@acme.example", "b@acme.example")
    assert policy.decide(other, now=0.7, limiter=limiter).decision == "allow"  # counted per sender


def test_the_largest_limit_loads_and_decides() -> None:
    policy = policy_of("default allow\nrule r:\n  limit 1000000000 per day by sender\n  drop\n")
    assert policy.decide(Event.message("a@acme.example", "b@x.example")).decision == "allow"


def test_directory_groups_and_attrs(tmp_path: Path) -> None:
    (tmp_path / "users.json").write_text(json.dumps({"Alice@ACME.example": {"groups": ["vip"], "level": 3}}))
    policy = load_policy(
        text=HEAD + 'directory "users.json"\ndefault deny\n'
        'rule vip:\n  when "vip" in sender.groups && sender.attrs.level > 2\n  allow\n',
        base_dir=tmp_path,
    )
    assert policy.decide(Event.message("alice@acme.example/x", "b@acme.example")).rule == "vip"
    assert policy.decide(Event.message("bob@acme.example", "b@acme.example")).rule is None


def test_include_and_list_file(tmp_path: Path) -> None:
    (tmp_path / "lists.txt").write_text("# partners\nPartner.Example\n\nsip:Bob@Other.Example  # a person\n")
    (tmp_path / "partner.rules").write_text(
        "rule partner:\n  when recipient.domain in partners || recipient.address in partners\n  allow\n"
    )
    policy = load_policy(
        text=HEAD + 'list partners = file "lists.txt"\ndefault deny\ninclude "partner.rules"\n',
        base_dir=tmp_path,
    )
    assert policy.lists["partners"] == ("partner.example", "bob@other.example")
    assert policy.decide(Event.message("a@acme.example", "x@partner.example")).rule == "partner"
    assert policy.decide(Event.message("a@acme.example", "Bob@other.example")).rule == "partner"
    assert len(policy.files) == 2


def test_revision_is_the_texts_not_the_path_they_were_loaded_by(tmp_path: Path, monkeypatch) -> None:
    """docs/cli.md: `policy_revision` identifies the exact policy text loaded. The same bytes loaded by a
    relative path, an absolute one, from a copy elsewhere (Kamailio's workers load a snapshot copy)
    or as text= give one revision; a change to the policy or to a file it reads gives another."""
    text = HEAD + 'list partners = file "lists.txt"\ndefault deny\ninclude "partner.rules"\n'
    for folder in (tmp_path / "a", tmp_path / "b" / "copy"):
        folder.mkdir(parents=True)
        (folder / "lists.txt").write_text("partner.example\n")
        (folder / "partner.rules").write_text("rule partner:\n  when recipient.domain in partners\n  allow\n")
        (folder / "p.policy").write_text(text)
    monkeypatch.chdir(tmp_path)
    revisions = {
        load_policy("a/p.policy").revision,
        load_policy(str(tmp_path / "a" / "p.policy")).revision,
        load_policy(tmp_path / "b" / "copy" / "p.policy").revision,
        load_policy(text=text, base_dir=tmp_path / "a").revision,
    }
    assert len(revisions) == 1
    (tmp_path / "b" / "copy" / "lists.txt").write_text("partner.example\nother.example\n")
    assert load_policy(tmp_path / "b" / "copy" / "p.policy").revision not in revisions
    assert load_policy(text=text + "# a comment\n", base_dir=tmp_path / "a").revision not in revisions


def test_index_gives_the_same_decisions_as_walking_every_rule() -> None:
    text = (
        HEAD
        + 'list p = ["p1.example", "p2.example"]\ndefault deny\n'
        + "".join(
            f"rule r{i}:\n  when {cond}\n  {effect}\n"
            for i, (cond, effect) in enumerate(
                [
                    ('direction == "outbound" && recipient.domain in p', "allow"),
                    ('sender.address == "a@acme.example" && body.matches("(")', "deny"),
                    ('"vip" in sender.groups || kind == "call"', "allow"),
                    ('kind == "presence" && recipient.domain == "p1.example"', "drop"),
                    ('sender.domain in ["p2.example"] && size > 3', 'redirect to "x@acme.example"'),
                    ('direction == "internal"', 'tag "int"'),
                ]
            )
        )
    )
    model = load_model(text=text)
    indexed, plain = compile_policy(model), compile_policy(model, use_index=False)
    assert indexed._index is not None and plain._index is None
    users = ["a@acme.example", "b@acme.example", "c@p1.example", "d@p2.example", "e@q.example"]
    for kind in ("message", "presence", "call", "file"):
        for s in users:
            for r in users:
                for body in ("", "hello world"):
                    a = indexed.decide(Event._of_kind(kind, s, r, {"body": body}))
                    b = plain.decide(Event._of_kind(kind, s, r, {"body": body}))
                    assert a.to_json() == b.to_json(), (kind, s, r, body)


# -- events ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["message", "groupchat", "presence", "subscribe", "join", "call", "file", "login", "iq"]
)
def test_event_constructor_per_kind(kind: str) -> None:
    event = getattr(Event, kind)(
        "Alice@acme.example/r", "bob@acme.example", body="b", client={"ip": "10.0.0.1"}
    )
    assert (event.kind, event.sender.address, event.sender.resource, event.body) == (
        kind,
        "alice@acme.example",
        "r",
        "b",
    )
    assert event.to_json()["from"] == "Alice@acme.example/r"


def test_event_constructors_refuse_unknown_keywords() -> None:
    """docs/cli.md: each constructor takes 'any other event field as keywords'; a misspelt one was ignored,
    so Event.message(..., bdy="x") decided on an empty body."""
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bdy'"):
        Event.message("a@acme.example", "b@x.example", bdy="x")
    event = Event.call(
        "a@acme.example",
        "b@x.example",
        body="b",
        subject="s",
        type="t",
        size=1,
        payload=["p"],
        headers={"h": "v"},
        client={"ip": "10.0.0.1"},
        time="2026-11-24T10:00:00Z",
        protocol="xmpp",
    )
    assert (event.kind, event.body, event.size, event.headers) == ("call", "b", 1, {"h": "v"})


@pytest.mark.parametrize(
    "data, field",
    [
        ({"from": "a@b.example", "to": "c@d.example"}, "kind"),
        ({"kind": "mesage", "from": "a@b.example", "to": "c@d.example"}, "kind"),
        ({"kind": "message", "to": "c@d.example"}, "from"),
        ({"kind": "message", "from": "a@b.example"}, "to"),
        ({"kind": "message", "from": 5, "to": "c@d.example"}, "from"),
        ({"kind": "message", "from": "@b.example", "to": "c@d.example"}, "from"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "body": 3}, "body"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "size": "big"}, "size"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": "yesterday"}, "time"),
        (
            {"kind": "message", "from": "a@b.example", "to": "c@d.example", "client": {"port": "5222"}},
            "client.port",
        ),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "headers": {"x": 1}}, "headers"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "payload": "x"}, "payload"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "protocol": "irc"}, "protocol"),
        ({"kind": ["message"], "from": "a@b.example", "to": "c@d.example"}, "kind"),
        ({"kind": "message", "from": "  ", "to": "c@d.example"}, "from"),
        ({"kind": "message", "from": "a@b.example", "to": ""}, "to"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "size": True}, "size"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "size": -1}, "size"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "headers": None}, "headers"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "headers": []}, "headers"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "payload": None}, "payload"),
        ({"kind": "message", "from": "a@b.example", "to": "c@d.example", "payload": ["a", 2]}, "payload"),
    ],
)
def test_invalid_events_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(EventError, match=f"^field '{re.escape(field)}'"):
        Event.from_json(data)


def test_unusual_but_valid_members_are_accepted_as_before() -> None:
    """from_json checks the usual shapes inline; the unusual valid ones take the long way, same result."""
    from collections import OrderedDict

    event = Event.from_json(
        OrderedDict(
            kind="message",
            **{"from": " Alice@B.example ", "to": "c@d.example"},
            body=None,
            headers=OrderedDict(X="1"),
            payload=["p"],
            size=0,
        )
    )
    assert (event.sender.address, event.body, event.headers, event.payload, event.size) == (
        "alice@b.example",
        "",
        {"x": "1"},
        ["p"],
        0,
    )


def test_address_and_time_caches_never_answer_for_another_protocol_or_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Event addresses are remembered (addresses.event_address, for the service and the Kamailio
    adapter alike) per event protocol, bounded, never for a failed parse or a long text."""
    from policyplug import addresses
    from policyplug.addresses import AddressError, event_address, parse_address

    monkeypatch.setattr(addresses, "ADDRESS_CACHE_SIZE", 4)
    monkeypatch.setattr(addresses, "_EVENT_ADDRESSES", {"xmpp": {}, "sip": {}})
    as_jid = Event.from_json(
        {"kind": "message", "from": "a@b.example", "to": "c@d.example", "protocol": "xmpp"}
    )
    as_sip = Event.from_json(
        {"kind": "message", "from": "a@b.example", "to": "c@d.example", "protocol": "sip"}
    )
    assert (as_jid.sender.protocol, as_jid.sender.scheme) == ("xmpp", "xmpp")
    assert (as_sip.sender.protocol, as_sip.sender.scheme) == ("sip", "sip")
    assert event_address("sip:%62ob@ACME.example", "xmpp") == parse_address(
        "sip:%62ob@ACME.example"
    )  # scheme wins
    first = event_address("sip:bob@acme.example", "sip")
    assert event_address("sip:bob@acme.example", "sip") is first
    for _ in range(2):
        with pytest.raises(AddressError):
            event_address("sip:@acme.example", "sip")
    long_uri = "sip:" + "a" * 300 + "@acme.example"
    assert event_address(long_uri, "sip").user == "a" * 300
    assert (
        "sip:@acme.example" not in addresses._EVENT_ADDRESSES["sip"]
        and long_uri not in addresses._EVENT_ADDRESSES["sip"]
    )
    for i in range(20):  # a flood of distinct addresses: the cache stays bounded, answers stay right
        event = Event.from_json({"kind": "message", "from": f"u{i}@b.example", "to": "c@d.example"})
        assert event.sender.address == f"u{i}@b.example"
    assert all(len(cache) <= 4 for cache in addresses._EVENT_ADDRESSES.values())
    times = [
        "2026-11-24T10:00:00Z",
        "2026-11-24T10:00:00Z",
        "2026-11-24T11:00:00+01:00",
        "2026-11-24T10:00:01Z",
    ]
    got = [
        Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": t}).time
        for t in times
    ]
    assert [t.isoformat() for t in got] == ["2026-11-24T10:00:00+00:00"] * 3 + ["2026-11-24T10:00:01+00:00"]


def test_rfc3339_lower_case_t_and_z_are_accepted() -> None:
    """RFC 3339 section 5.6: 'T' and 'Z' may alternatively be lower case (they were an invalid event)."""
    for text in ("2026-11-24t10:00:00z", "2026-11-24T10:00:00z", "2026-11-24t11:00:00.5+01:00"):
        event = Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": text})
        assert event.time.isoformat().startswith("2026-11-24T10:00:00"), text
    with pytest.raises(EventError, match="^field 'time'"):
        Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": "tomorrow"})


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_time_beyond_what_utc_can_hold_is_an_invalid_event_not_a_crash(text: str, tmp_path: Path) -> None:
    """Converting these to UTC raised OverflowError: eval died with a traceback (exit 1, not 2)."""
    with pytest.raises(EventError, match="^field 'time': out of range"):
        Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": text})
    result = run_cli(
        "eval",
        str(ACME),
        stdin=json.dumps({"kind": "message", "from": "a@b.example", "to": "c@d.example", "time": text}),
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"invalid event: field 'time': out of range: '{text}'\n"


def test_protocol_is_inferred_from_sip_addresses() -> None:
    assert (
        Event.from_json({"kind": "call", "from": "sip:a@b.example", "to": "sip:c@d.example"}).protocol
        == "sip"
    )
    assert Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example"}).protocol == "xmpp"
    for sender, recipient, protocol in [
        ("sales@b.example", "c@d.example", "xmpp"),
        ("a@b.example", "SIPS:c@d.example", "sip"),
        ("s@b.example", "sip:c@d.example", "sip"),
        ("Sip:a@b.example", "c@d.example", "sip"),
    ]:
        assert Event.from_json({"kind": "message", "from": sender, "to": recipient}).protocol == protocol, (
            sender
        )


def test_from_json_builds_the_same_event_as_the_constructor() -> None:
    """from_json sets the slots itself (no keyword call to __init__) and takes the usual client shape
    inline: every member must come out as __init__ would make it."""
    from datetime import UTC, datetime

    slots = [s for s in Event.__slots__ if s != "_activation_cache"]
    cases = [
        (
            {"client": {"ip": "10.0.0.1", "port": 5222, "secure": True}},
            {"client": {"ip": "10.0.0.1", "port": 5222, "secure": True}},
        ),
        (
            {"client": {"ip": "10.0.0.1", "port": 5222, "secure": True, "extra": 1}},
            {"client": {"ip": "10.0.0.1", "port": 5222, "secure": True}},
        ),
        ({"client": {"ip": "10.0.0.1"}}, {"client": {"ip": "10.0.0.1", "port": 0, "secure": False}}),
        ({"body": "Grüße"}, {"body": "Grüße", "size": 7}),
        ({"body": "plain", "size": 3}, {"body": "plain", "size": 3}),
    ]
    for extra, expected in cases:
        event = Event.from_json(
            {
                "kind": "message",
                "from": "a@b.example",
                "to": "c@d.example",
                "time": "2026-11-24T10:00:00Z",
                **extra,
            }
        )
        made = Event(
            "message",
            event.sender,
            event.recipient,
            protocol="xmpp",
            time=event.time,
            **{k: v for k, v in expected.items()},
        )
        assert {s: getattr(event, s) for s in slots} == {s: getattr(made, s) for s in slots}, extra
        assert event._activation_cache is None
    client = {"ip": "10.0.0.1", "port": 5222, "secure": True}
    assert (
        Event.from_json(
            {"kind": "message", "from": "a@b.example", "to": "c@d.example", "client": client}
        ).client
        is not client
    ), "the event's client is its own copy"
    with pytest.raises(EventError, match="^field 'client.port'"):
        Event.from_json(
            {
                "kind": "message",
                "from": "a@b.example",
                "to": "c@d.example",
                "client": {"ip": "10.0.0.1", "port": True, "secure": True},
            }
        )
    before = datetime.now(UTC)
    assert (
        before
        <= Event.from_json({"kind": "message", "from": "a@b.example", "to": "c@d.example"}).time
        <= datetime.now(UTC)
    )


# -- command line -----------------------------------------------------------------------------------------


def test_eval_prints_the_decision_json_and_explains_on_stderr() -> None:
    result = run_cli("eval", str(ACME), "--event", str(EVENTS / "02-partner-chat.json"), "--explain")
    assert result.returncode == 0
    decision = json.loads(result.stdout)
    assert set(decision) == {
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
    assert (decision["decision"], decision["rule"], decision["copy_to"]) == (
        "allow",
        "partner_chat",
        ["archive@acme.example"],
    )
    assert "MATCH partner_chat" in result.stderr and "skip  internal_traffic" in result.stderr


def test_eval_reads_standard_input_and_exit_codes(tmp_path: Path) -> None:
    ok = run_cli(
        "eval", str(ACME), stdin='{"kind": "message", "from": "eve@evil.example", "to": "alice@acme.example"}'
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["decision"] == "deny"
    bad_event = run_cli("eval", str(ACME), "--event", "-", stdin='{"kind": "message", "from": "a@b.example"}')
    assert bad_event.returncode == 2
    assert bad_event.stderr.strip() == "invalid event: field 'to': missing"
    not_json = run_cli("eval", str(ACME), stdin="{")
    assert not_json.returncode == 2 and len(not_json.stderr.strip().splitlines()) == 1
    bad_policy = tmp_path / "bad.policy"
    bad_policy.write_text('policy "x"\n')
    assert run_cli("eval", str(bad_policy), stdin="{}").returncode == 1


def test_test_command_reports_failures_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "p.policy"
    path.write_text(
        HEAD + "default deny\nrule a:\n  allow\n"
        'test good:\n  message from "a@acme.example" to "b@acme.example"\n  expect allow by a\n'
        'test wrong:\n  message from "a@acme.example" to "b@acme.example"\n  expect deny by default\n'
    )
    result = run_cli("test", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert len(lines) == 2 and "wrong" in lines[0] and "expected deny by default" in lines[0]
    assert "decided allow by a" in lines[0]


def test_a_test_that_cannot_run_says_why_in_its_one_line() -> None:
    from policyplug import nodes
    from policyplug.cli import _one_line
    from policyplug.diagnostics import Location
    from policyplug.tester import run_test

    policy = policy_of("default deny\n")
    here = Location("x.policy", 3, 1)
    test = nodes.Test(
        here,
        "t",
        nodes.TestEvent(here, "message", "a@acme.example", "b@x.example", at="never"),
        expect=nodes.Expectation(here, "deny"),
    )  # as the loader would refuse it: built by hand
    line = _one_line(run_test(policy, test))
    assert line == (
        "x.policy:3 t: expected deny; not run: invalid test event: field 'time': "
        "not an RFC 3339 time: 'never'"
    )


def policy_test_lines(tmp_path: Path, text: str) -> list[str]:
    """`policyplug test` of a policy made of HEAD + text: its output lines."""
    path = tmp_path / "p.policy"
    path.write_text(HEAD + text)
    return run_cli("test", str(path)).stdout.strip().splitlines()


def test_expected_copy_and_redirect_addresses_compare_as_addresses(tmp_path: Path) -> None:
    """`expect copy to "archive@acme.example"` holds for a rule's `copy to "Archive@ACME.example"`: the
    same address (it failed, comparing spellings); another address still fails."""
    lines = policy_test_lines(
        tmp_path,
        (
            'default deny\nrule r:\n  when body == "r"\n  redirect to "Desk@ACME.example"\n'
            'rule c:\n  allow\n  copy to "Archive@ACME.Example"\n  copy to "sip:Rec@acme.example"\n'
            'test redirected:\n  message from "a@acme.example" to "b@x.example" body "r"\n'
            '  expect redirect to "desk@acme.example"\n'
            'test copied:\n  message from "a@acme.example" to "b@x.example"\n'
            '  expect allow copy to "archive@acme.example" copy to "sip:rec@ACME.example"\n'
            'test other_copy:\n  message from "a@acme.example" to "b@x.example"\n'
            '  expect allow copy to "rec@acme.example"\n'
        ),
    )
    assert lines[-1] == "2 passed, 1 failed" and len(lines) == 2 and "other_copy" in lines[0], lines


def test_expected_sip_redirects_and_copies_keep_scheme_port_and_parameters(tmp_path: Path) -> None:
    """Comparing addresses after normalisation must not make a test pass when a SIP redirect or copy
    goes over another scheme, to another port or with other parameters."""
    lines = policy_test_lines(
        tmp_path,
        (
            'default deny\nrule r:\n  when body == "r"\n'
            '  redirect to "sips:Desk@ACME.example:5061;transport=tls"\n'
            'rule c:\n  allow\n  copy to "sip:rec@acme.example:5090"\n'
            'test same_uri_other_case:\n  message from "a@acme.example" to "b@x.example" body "r"\n'
            '  expect redirect to "sips:desk@acme.example:5061;transport=TLS"\n'
            'test plain_sip:\n  message from "a@acme.example" to "b@x.example" body "r"\n'
            '  expect redirect to "sips:desk@acme.example"\n'
            'test other_scheme:\n  message from "a@acme.example" to "b@x.example" body "r"\n'
            '  expect redirect to "sip:desk@acme.example:5061;transport=tls"\n'
            'test other_port:\n  message from "a@acme.example" to "b@x.example"\n'
            '  expect allow copy to "sip:rec@acme.example:5080"\n'
            'test same_port:\n  message from "a@acme.example" to "b@x.example"\n'
            '  expect allow copy to "sip:REC@acme.example:5090"\n'
        ),
    )
    assert lines[-1] == "2 passed, 3 failed", lines
    failed = " ".join(lines[:-1])
    assert all(name in failed for name in ("plain_sip", "other_scheme", "other_port")), lines


def test_check_on_a_folder_and_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "a.policy").write_text(HEAD + "default allow\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.policy").write_text(HEAD + "default allow\nrule x:\n  when nope\n  allow\n")
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 1
    assert "b.policy:5:8: error: unknown name 'nope'" in result.stderr
    assert run_cli("check", str(tmp_path / "a.policy")).returncode == 0


def test_a_constant_pattern_re2_rejects_loads_with_a_located_warning(tmp_path: Path) -> None:
    """docs/language.md makes a bad regex a run-time error (the rule does not match), so the policy
    loads; but `check` says where the pattern is, and RE2's own unlocated log line stays away."""
    path = tmp_path / "p.policy"
    path.write_text(
        HEAD + 'define card = body.matches("(?:[0-9]")\ndefault allow\n'
        'rule dlp:\n  when card || body.matches(r"[a") || body.matches("a+")\n  deny "card"\n'
    )
    policy = load_policy(path)
    assert [(w.location.line, w.location.column, w.severity) for w in policy.warnings] == [
        (3, 28, "warning"),
        (6, 29, "warning"),
    ]
    decision = policy.decide(Event.message("a@acme.example", "b@acme.example", body="1234"))
    assert decision.decision == "allow" and decision.errors  # fails open, as the spec says, and says why
    result = run_cli("check", str(path))
    assert result.returncode == 0
    assert result.stdout.strip().endswith("(policy 't', 1 rules, 0 tests, 2 warnings)")
    assert f"{path}:3:28: warning: RE2 rejects this pattern (missing ): (?:[0-9])" in result.stderr
    assert (
        '    3 | define card = body.matches("(?:[0-9]")\n      |                            ^^^^^^^^^^'
        in result.stderr
    )
    assert f"{path}:6:29: warning: RE2 rejects this pattern (missing ]: [a)" in result.stderr
    assert "re2.cc" not in result.stderr and "absl" not in result.stderr


def test_fmt_rewrites_keeps_comments_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "p.policy"
    path.write_text(
        '# head\npolicy  "t"   # name\n\n\n\ndefault deny\n# about r\n   rule r:\n        when direction == "internal" &&\n'
        '  true   # why\n      allow\ntest t:\n message from "a@x.example" to "b@x.example"\n'
        "     expect deny\n"
    )
    check = run_cli("fmt", "--check", str(path))
    assert check.returncode == 1 and "would reformat" in check.stdout
    assert run_cli("fmt", str(path)).returncode == 0
    formatted = path.read_text()
    assert formatted.count("#") == 4
    assert '  when direction == "internal" &&\n      true  # why\n  allow\n' in formatted
    assert run_cli("fmt", "--check", str(path)).returncode == 0
    assert load_policy(path).rules[0].name == "r"


# -- pytest plugin -----------------------------------------------------------------------------------------

pytest_plugins = ["pytester"]


def test_pytest_plugin_collects_one_item_per_test_block(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".policy",
        rules=HEAD + "default deny\nrule a:\n  allow\n"
        'test passes:\n  message from "a@acme.example" to "b@acme.example"\n  expect allow by a\n'
        'test fails:\n  message from "a@acme.example" to "b@acme.example"\n  expect drop\n',
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*test 'fails' failed*", "*expected: drop*", "*decided:  allow by a*", "*MATCH a*"]
    )


def test_pytest_plugin_reports_invalid_policy_as_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".policy", broken=HEAD + "rule a:\n  when nope\n  allow\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*invalid policy*", "*unknown name 'nope'*"])


# -- content_complete (issue 15): the adapter says whether it extracted the content fully ----------


def test_content_complete_defaults_true_is_visible_to_rules_and_round_trips() -> None:
    from policyplug import load_policy
    from policyplug.events import EVENT_FIELDS, EventError

    policy = load_policy(
        text='policy "c"\nlocal domains ["acme.example"]\ndefault allow\n'
        'rule incomplete:\n  when !content_complete && direction == "outbound"\n'
        '  deny "content not fully read"\n'
        'test refused:\n  message from "a@acme.example" to "b@x.example"'
        ' with {"content_complete": false}\n  expect deny by incomplete\n'
    )
    base = {"kind": "message", "from": "a@acme.example", "to": "b@x.example"}
    full, null, partial = (
        Event.from_json(base),
        Event.from_json({**base, "content_complete": None}),
        Event.from_json({**base, "content_complete": False}),
    )
    assert (
        full.content_complete is True and null.content_complete is True and partial.content_complete is False
    )
    assert "content_complete" in EVENT_FIELDS
    assert policy.decide(full).decision == "allow" and policy.decide(partial).decision == "deny"
    partial._activation_cache = None
    assert policy.decide(partial, explain=True).decision == "deny"  # the unfused path sees it too
    assert policy.activation(partial)["content_complete"] is False
    assert "content_complete" not in full.to_json()
    assert Event.from_json(partial.to_json()).content_complete is False
    assert Event.message("a@acme.example", "b@x.example", content_complete=False).content_complete is False
    for bad in ("no", 0, 1, [], {}):
        with pytest.raises(EventError, match="field 'content_complete'"):
            Event.from_json({**base, "content_complete": bad})
    from policyplug.tester import run_test

    assert all(run_test(policy, test).passed for test in policy.tests)
    assert not policy.cacheable  # the decision depends on more than kind and addresses


def test_audit_record_carries_content_complete_only_when_false() -> None:
    import json

    from policyplug.audit.log import encode_event, event_record

    base = {"kind": "message", "from": "a@acme.example", "to": "b@x.example", "time": "2026-01-01T00:00:00Z"}
    for complete in (True, False):
        event = Event.from_json({**base, "content_complete": complete})
        for bodies in (True, False):
            assert json.loads(encode_event(event, bodies)) == event_record(event, bodies)
            assert ("content_complete" in json.loads(encode_event(event, bodies))) is (not complete)
