"""Every list of event members, condition variables and party or client fields agrees with the one
event schema (policyplug.schema): the ones derived from it by construction, and the ones the hot
paths and adapters spell out as literals (checked here, so a member added to the schema and
forgotten in one of them fails a test)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import orjson

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
    event_json = source[source.index("local function event_json") :]
    event_json = event_json[: event_json.index('return head .. "}"')]
    module = (PROSODY / "mod_policyplug.lua").read_text()
    login = module[module.index("local login = ") :]
    login = login[: login.index('"}}";') + 4]
    for piece in (event_json, login):
        members, client = _lua_json_keys(piece)
        assert set(schema.REQUIRED_MEMBERS) <= set(members), members
        assert set(members) <= set(schema.EVENT_MEMBERS), members
        assert client == list(schema.CLIENT_FIELDS)
    # the module reports unreadable content the way the schema names it
    assert "content_complete" in _lua_json_keys(event_json)[0]


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
