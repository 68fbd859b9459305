"""The event schema: the one place that names what an event holds and what a condition sees.

Everything else derives its lists from here: the event JSON's members (events, testevents), the
names a condition may use and their fields (cel.check), their CEL types (cel.compile). The hot
paths that build these values as dict literals (runtime.Policy.activation and its parties,
audit.record.encode_event, Event.to_json) and the adapters' event builders (the Prosody module's
Lua, the Kamailio adapter) are held to this schema by tests/test_schema.py.

CEL types are written as cel.compile reads them: 'string', 'int', 'bool', 'timestamp', 'dyn',
('list', T), ('map', K, V), ('rec', ((field, T), ...)).
"""

from __future__ import annotations

from typing import Any

CelType = Any  # str | tuple: see the module docstring

EVENT_KINDS = ("message", "groupchat", "presence", "subscribe", "join", "call", "file", "login", "iq")
PROTOCOLS = ("xmpp", "sip")
# how sender and recipient relate to the policy's `local domains` (docs/language.md)
DIRECTIONS = ("internal", "outbound", "inbound", "transit")

# A party (sender, recipient) as a condition sees it: its address, parts, and what the policy's
# `local domains` and `directory` say about it.
PARTY_FIELDS: dict[str, CelType] = {
    "address": "string",
    "user": "string",
    "domain": "string",
    "resource": "string",
    "local": "bool",
    "groups": ("list", "string"),
    "attrs": ("map", "string", "dyn"),
}
# The client connection an event came from (event JSON member `client`, condition variable `client`).
CLIENT_FIELDS: dict[str, CelType] = {"ip": "string", "port": "int", "secure": "bool"}

# The members of the event JSON (docs/cli.md), in this order: `kind`, `from` and `to` are required,
# the rest are the keyword arguments of Event.message(...) etc.
EVENT_MEMBERS = (
    "kind",
    "from",
    "to",
    "body",
    "time",
    "protocol",
    "client",
    "headers",
    "payload",
    "type",
    "subject",
    "size",
    "content_complete",
)
REQUIRED_MEMBERS = EVENT_MEMBERS[:3]
# an event member whose condition variable has another name; `direction` is derived by the policy
VARIABLE_OF_MEMBER = {"from": "sender", "to": "recipient"}

PARTY_TYPE: CelType = ("rec", tuple(PARTY_FIELDS.items()))
CLIENT_TYPE: CelType = ("rec", tuple(CLIENT_FIELDS.items()))

# What a condition can see (docs/language.md, "What a condition can see") and the CEL type of each.
VARIABLES: dict[str, CelType] = {
    "kind": "string",
    "protocol": "string",
    "direction": "string",
    "sender": PARTY_TYPE,
    "recipient": PARTY_TYPE,
    "body": "string",
    "subject": "string",
    "type": "string",
    "size": "int",
    "payload": ("list", "string"),
    "headers": ("map", "string", "string"),
    "client": CLIENT_TYPE,
    "time": "timestamp",
    "content_complete": "bool",
}
# the variables with fields, and their field names (`sender.domain`, `client.ip`)
FIELDS_OF: dict[str, tuple[str, ...]] = {
    name: tuple(field for field, _ in cel_type[1])
    for name, cel_type in VARIABLES.items()
    if isinstance(cel_type, tuple) and cel_type[0] == "rec"
}
