"""Every list of event members, condition variables and party or client fields agrees with the one
event schema (policyplug.schema): the ones derived from it by construction, and the ones the hot
paths and adapters spell out as literals (checked here, so a member added to the schema and
forgotten in one of them fails a test)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from policyplug import Event, load_policy, schema
from policyplug.audit.record import encode_event
from policyplug.cel import check
from policyplug.cel.compile import EVENT_SCHEMA
from policyplug.events import CLIENT_FIELDS, EVENT_FIELDS, KEYWORD_FIELDS

ROOT = Path(__file__).resolve().parent.parent
PROSODY = ROOT / "adapters" / "prosody"


def _full_event() -> Event:
    """An event with every member set, content_complete false (it is written only then)."""
    return Event.from_json(
        {
            "kind": "message",
            "from": "alice@acme.example/phone",
            "to": "bob@partner.example",
            "body": "hi",
            "subject": "s",
            "time": "2026-01-01T00:00:00Z",
            "protocol": "xmpp",
            "client": {"ip": "127.0.0.1", "port": 5222, "secure": True},
            "headers": {"h": "v"},
            "payload": ["urn:x"],
            "type": "chat",
            "size": 2,
            "content_complete": False,
        }
    )


def test_variables_are_the_event_members_as_a_condition_names_them_plus_direction() -> None:
    members = {schema.VARIABLE_OF_MEMBER.get(m, m) for m in schema.EVENT_MEMBERS}
    assert set(schema.VARIABLES) == members | {"direction"}
    assert schema.FIELDS_OF == {
        "sender": tuple(schema.PARTY_FIELDS),
        "recipient": tuple(schema.PARTY_FIELDS),
        "client": tuple(schema.CLIENT_FIELDS),
    }


def test_derived_lists_are_the_schema() -> None:
    assert EVENT_FIELDS == schema.EVENT_MEMBERS
    assert KEYWORD_FIELDS == tuple(m for m in schema.EVENT_MEMBERS if m not in schema.REQUIRED_MEMBERS)
    assert CLIENT_FIELDS == tuple(schema.CLIENT_FIELDS)
    assert check.EVENT_VARIABLES == tuple(schema.VARIABLES)
    assert check.FIELDS_OF is schema.FIELDS_OF
    assert EVENT_SCHEMA is schema.VARIABLES


def test_event_json_and_slots_cover_the_members() -> None:
    event = _full_event()
    assert set(event.to_json()) == set(schema.EVENT_MEMBERS)
    assert set(Event.__slots__) >= {schema.VARIABLE_OF_MEMBER.get(m, m) for m in schema.EVENT_MEMBERS}
    assert set(Event.message("a@x.example", "b@y.example").client) == set(schema.CLIENT_FIELDS)


def test_the_audit_record_writes_the_event_members() -> None:
    event = _full_event()
    assert set(orjson.loads(encode_event(event, True))) == set(schema.EVENT_MEMBERS)
    assert set(orjson.loads(encode_event(event, False))) == set(schema.EVENT_MEMBERS) - {"body", "subject"}


def test_the_activation_holds_every_variable_and_party_field() -> None:
    policy = load_policy(text='policy "p"\nlocal domains ["acme.example"]\ndefault allow\n')
    activation = policy.activation(_full_event())
    assert set(activation) == set(schema.VARIABLES)
    assert set(activation["sender"]) == set(schema.PARTY_FIELDS)
    assert set(activation["recipient"]) == set(schema.PARTY_FIELDS)
    assert set(activation["client"]) == set(schema.CLIENT_FIELDS)


def _lua_json_keys(text: str) -> tuple[list[str], list[str]]:
    """(event members, client fields) named in the JSON a piece of the Prosody module builds."""
    client = re.search(r'"client":\{(.*?)\}', text, re.S)
    assert client is not None
    client_keys = re.findall(r'[{,]"([a-z_]+)":', client.group(0).removeprefix('"client":'))
    event_keys = re.findall(r'[{,]"([a-z_]+)":', text.replace(client.group(1), ""))
    return event_keys, client_keys


def test_the_prosody_modules_event_json_uses_the_schema() -> None:
    source = (PROSODY / "policyplug_event.lib.lua").read_text()
    head = source[source.index("local function event_head") :]
    head = head[: head.index('"}";') + 4]
    members, client = _lua_json_keys(head)
    assert set(schema.REQUIRED_MEMBERS) <= set(members), members
    assert set(members) <= set(schema.EVENT_MEMBERS), members
    assert client == list(schema.CLIENT_FIELDS)
    event_json = source[source.index("local function event_json") :]
    event_json = event_json[: event_json.index('return head .. "}"')]
    assert "event_head(" in event_json
    added = re.findall(r'[{,]"([a-z_]+)":', event_json)  # the content members, after the head
    assert set(added) <= set(schema.EVENT_MEMBERS), added
    # the module reports unreadable content the way the schema names it
    assert "content_complete" in added


def test_the_prosody_module_spells_the_event_json_once() -> None:
    """Stanzas and logins get their event JSON from the one builder (event_head): no other piece
    of the module writes event members."""
    for path in sorted(PROSODY.glob("*.lua")):
        text = path.read_text()
        for member in ("kind", "from", "client", "protocol"):
            found = text.count(f'"{member}":')
            expected = 1 if path.name == "policyplug_event.lib.lua" else 0
            assert found == expected, (path.name, member, found)


# Builds a login's and a stanza's event JSON with the module's own event lib and Prosody's libraries
LUA_EVENTS = r"""
package.path = "/usr/lib/prosody/?.lua;" .. package.path;
package.cpath = "/usr/lib/prosody/?.so;" .. package.cpath;
local st = require "util.stanza";
local events = assert(loadfile(arg[1], "t", _G))();
local conn = { clientport = function () return 40123; end };
local session = { full_jid = "alice@acme.example/ph\"one", host = "acme.example", ip = "::1",
	secure = true, conn = conn };
print(events.login_json(session));
local stanza = st.message({ from = "alice@acme.example/phone", to = "bob@partner.example", type = "chat" })
	:text_tag("subject", "s"):text_tag("body", "hi\n\"there\"");
stanza:tag("x", { xmlns = "urn:x" }):up();
local body, subject, unreadable = events.content_of(stanza);
print(events.event_json(session, stanza, events.kind_of(stanza), body, subject, unreadable or "test"));
"""


def test_the_prosody_modules_event_json_is_an_event(tmp_path: Path) -> None:
    """The JSON the event lib builds for a login and a stanza (run by lua5.4 with Prosody's own
    libraries) has the schema's members and client fields, and the engine reads it as written."""
    lua = shutil.which("lua5.4")
    if lua is None or not Path("/usr/lib/prosody/util/stanza.lua").exists():
        pytest.skip("needs lua5.4 and Prosody's libraries")
    script = tmp_path / "events.lua"
    script.write_text(LUA_EVENTS)
    out = subprocess.run(
        [lua, str(script), str(PROSODY / "policyplug_event.lib.lua")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    login, message = (orjson.loads(line) for line in out)
    for event in (login, message):
        assert set(schema.REQUIRED_MEMBERS) <= set(event) <= set(schema.EVENT_MEMBERS), event
        assert list(event["client"]) == list(schema.CLIENT_FIELDS)
        assert event["client"] == {"ip": "::1", "port": 40123, "secure": True}
    assert login == {
        "kind": "login",
        "from": 'alice@acme.example/ph"one',
        "to": "acme.example",
        "protocol": "xmpp",
        "type": "bind",
        "size": 0,
        "payload": [],
        "client": {"ip": "::1", "port": 40123, "secure": True},
    }
    parsed = Event.from_json(login)
    assert (parsed.kind, parsed.sender.address, parsed.sender.resource, parsed.recipient.address) == (
        "login",
        "alice@acme.example",
        'ph"one',
        "acme.example",
    )
    assert message["kind"] == "message" and message["type"] == "chat"
    assert (message["body"], message["subject"]) == ('hi\n"there"', "s")
    assert message["payload"] == ["urn:x"] and message["content_complete"] is False
    parsed = Event.from_json(message)
    assert parsed.body == 'hi\n"there"' and parsed.content_complete is False


def test_the_kamailio_adapters_event_json_uses_the_schema() -> None:
    spec = importlib.util.spec_from_file_location(
        "sip_event_for_schema", ROOT / "adapters" / "kamailio" / "sip_event.py"
    )
    assert spec is not None and spec.loader is not None
    sip_event = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sip_event)
    raw = (
        b"MESSAGE sip:bob@acme.example SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@acme.example>;tag=1\r\nTo: <sip:bob@acme.example>\r\nCall-ID: c1\r\n"
        b"CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    )
    event = sip_event.event_json(
        method="MESSAGE",
        raw=raw,
        from_uri="sip:alice@acme.example",
        to_uri="sip:bob@acme.example",
        source_ip="127.0.0.1",
        source_port=5062,
        transport="udp",
        time="2026-01-01T00:00:00Z",
    )
    assert event is not None
    assert set(event) <= set(schema.EVENT_MEMBERS) and set(schema.REQUIRED_MEMBERS) <= set(event)
    assert set(schema.EVENT_MEMBERS) - set(event) == {"content_complete"}  # written only when false
    assert list(event["client"]) == list(schema.CLIENT_FIELDS)
    Event.from_json(event)  # and the engine takes it
