"""Fuzz targets (hypothesis) for what anyone who can reach the socket controls: the event JSON and
the addresses in it.

Event.from_json gives an Event or an EventError and nothing else, whatever the JSON; an Event is
decided (never an exception), alike with and without the rule index, and its JSON reads back as
itself; parse_address gives an Address or an AddressError, and the normal form is a fixpoint.

CI runs these with the `ci` profile (derandomized: a fixed set of examples, see tests/conftest.py).
To fuzz for longer, raise the number of examples per target (docs/compiler.md, "Tests"):
`POLICYPLUG_FUZZ_EXAMPLES=50000 python3 -m pytest tests/test_fuzz_events.py --hypothesis-seed=$RANDOM`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyplug import Event, EventError, load_policy
from policyplug.addresses import DOT_LIKES, AddressError, parse_address
from policyplug.events import EVENT_FIELDS
from policyplug.nodes import EVENT_KINDS

EXAMPLES = int(os.environ.get("POLICYPLUG_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

POLICY = load_policy(
    text="""policy "fuzz"
local domains ["acme.example", "bücher.example"]
list blocked = ["evil.example", "bob@evil.example"]
on error deny
default allow
rule blocked_domains:
  when recipient.domain in blocked || sender.domain in blocked || recipient.address in blocked
  deny "blocked"
rule numbers:
  when direction == "outbound" && body.matches("[0-9]{4}") && subject.size() >= 0
  tag "numbers"
rule headers_and_payload:
  when headers.exists(k, k.startsWith("x-")) || payload.exists(p, p == "urn:x")
  tag "h"
rule client_fields:
  when client.secure && client.port > 10 && client.ip.startsWith("10.")
  tag "c"
rule time_size_type:
  when time.getHours("Europe/Berlin") > 3 && size > 10 && type == "chat"
  tag "t"
rule incomplete:
  when !content_complete && direction == "outbound"
  deny "incomplete"
rule parts:
  when sender.resource.contains("x") && recipient.user.size() > 2 && protocol == "sip"
  tag "s"
rule groups_attrs:
  when "staff" in sender.groups || sender.attrs.level > 1
  tag "g"
"""
)

# -- addresses: pieces an attacker would combine ------------------------------------------------------

_PIECES = [
    "a",
    "B",
    "bob",
    "\uff42",
    "evil",
    "example",
    "acme",
    ".",
    *DOT_LIKES,
    "..",
    "@",
    "/",
    ":",
    ";",
    "?",
    "=",
    "<",
    ">",
    '"',
    " ",
    "\t",
    "\r\n",
    "%",
    "%41",
    "%3b",
    "%3a",
    "%25",
    "%00",
    "%0a",
    "%e2%80%8b",
    "%ff",
    "sip:",
    "SIPS:",
    "xmpp:",
    "tel:",
    "[",
    "]",
    "::1",
    "1.2.3.4",
    ":5060",
    ";maddr=evil.example",
    ";transport=tcp",
    "?h=x",
    "xn--",
    "xn--bcher-kva",
    "ß",
    "ü",
    "u\u0308",
    "İ",
    "\u200d",
    "\u202e",
    "ﬁ",
    "\U0001d41b",
    "\u24d1",
    "\x00",
    "\x7f",
    "\u0085",
    "\ud800",
    "-",
    "_",
    "*",
    "~",
]
address_text = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=12).map("".join),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
)
_ADDRESS_EXAMPLES = [
    "alice@acme.example",
    "bob@evil.example",
    "sip:bob@evil.example",
    "evil.example",
    "alice@acme.example/desk",
    '"Bob" <sip:bob@evil.example>;tag=1',
    "room@conference.acme.example",
]
address_value = st.sampled_from(_ADDRESS_EXAMPLES) | address_text

# -- event JSON: well-formed members, wrong types and junk, unknown keys -------------------------------

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 2**63 - 1, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_any = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
MEMBERS: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(EVENT_KINDS) | json_any,
    "from": address_value | json_any,
    "to": address_value | json_any,
    "body": st.text(max_size=40) | json_any,
    "subject": st.text(max_size=10) | json_any,
    "type": st.sampled_from(["chat", "normal", "MESSAGE", ""]) | json_any,
    "size": st.integers(-5, 2**64) | json_any,
    "time": st.sampled_from(
        [
            "2026-12-07T01:00:00Z",
            "2026-12-07t01:00:00z",
            "2026-12-07T01:00:00+14:00",
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-12-07 01:00",
            "now",
        ]
    )
    | st.text(max_size=30)
    | json_any,
    "protocol": st.sampled_from(["xmpp", "sip", "XMPP", None]) | json_any,
    "client": st.fixed_dictionaries(
        {},
        optional={
            "ip": st.sampled_from(["10.0.0.1", "::1"]) | json_any,
            "port": st.integers(-1, 70000) | json_any,
            "secure": st.booleans() | json_any,
        },
    )
    | json_any,
    "headers": st.dictionaries(
        st.sampled_from(["X-A", "x-b", "Subject", "content-type"]) | st.text(max_size=5),
        st.text(max_size=10) | json_any,
        max_size=3,
    )
    | json_any,
    "payload": st.lists(
        st.sampled_from(["urn:x", "urn:xmpp:jingle:1"]) | st.text(max_size=5) | json_any, max_size=3
    )
    | json_any,
    "content_complete": st.booleans() | json_any,
}
event_json = st.fixed_dictionaries(
    {"kind": MEMBERS["kind"], "from": MEMBERS["from"], "to": MEMBERS["to"]},
    optional={**{k: v for k, v in MEMBERS.items() if k not in ("kind", "from", "to")}, "unknown": json_any},
)


def _decide_both_ways(event: Event) -> None:
    decision = POLICY.decide(event)
    assert decision.decision in ("allow", "deny", "drop", "redirect")
    event._activation_cache = None
    walked = POLICY.decide(event, explain=True)  # every rule, condition by condition: the index is exact
    assert (walked.decision, walked.rule, walked.reason, walked.tags, walked.errors) == (
        decision.decision,
        decision.rule,
        decision.reason,
        decision.tags,
        decision.errors,
    )
    json.dumps(decision.to_json())  # the service's answer is plain JSON


@FUZZ
@given(event_json)
def test_event_json_gives_a_decision_or_an_event_error(data: dict[str, Any]) -> None:
    try:
        event = Event.from_json(data)
    except EventError as exc:
        message = str(exc)
        assert "\n" not in message and (message.startswith("field '") or message.startswith("an event must"))
        return
    _decide_both_ways(event)
    # the event's JSON reads back as itself
    again = Event.from_json(event.to_json())
    assert again.to_json() == event.to_json()
    assert (again.sender.address, again.recipient.address) == (event.sender.address, event.recipient.address)


@FUZZ
@given(
    st.one_of(
        json_any,
        st.text(max_size=60).map(lambda t: _loads_or(t, t)),
        st.binary(max_size=60).map(lambda b: _loads_or(b, None)),
    )
)
def test_any_json_value_gives_a_decision_or_an_event_error(value: Any) -> None:
    """What a client's line decodes to, whatever it is: never anything but an Event or EventError."""
    try:
        event = Event.from_json(value)
    except EventError:
        return
    _decide_both_ways(event)


def _loads_or(text: str | bytes, default: Any) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return default


@FUZZ
@given(address_text, st.sampled_from([None, "xmpp", "sip"]))
def test_addresses_normalise_or_raise_address_error_and_are_fixpoints(raw: str, protocol: str | None) -> None:
    try:
        parsed = parse_address(raw, protocol)
    except AddressError as exc:
        assert "\n" not in str(exc)
        return
    again = parse_address(parsed.address, parsed.protocol)
    assert (again.address, again.user, again.domain) == (parsed.address, parsed.user, parsed.domain)
    assert "\x00" not in parsed.address and not any(c in parsed.domain for c in DOT_LIKES)
    assert not parsed.domain.endswith(".") and ".." not in parsed.domain


@FUZZ
@given(address_text, address_text)
def test_addresses_in_events_are_invalid_or_decided(sender: str, recipient: str) -> None:
    try:
        event = Event.from_json({"kind": "message", "from": sender, "to": recipient, "body": "x"})
    except EventError as exc:
        assert str(exc).startswith(("field 'from'", "field 'to'"))
        return
    assert event.recipient.domain != "evil.example" or POLICY.decide(event).decision == "deny"
    _decide_both_ways(event)


def test_fuzzed_event_json_covers_every_member() -> None:
    """A member added to the event JSON is fuzzed too (or this fails)."""
    assert set(MEMBERS) == set(EVENT_FIELDS)
