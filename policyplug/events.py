"""Events: the protocol-neutral description of one message, presence, call, ... to decide on.

An Event holds the raw addresses as the adapter saw them and their normalised forms
(policyplug.addresses). Everything a policy adds (direction, groups, attrs) is derived when
the policy decides, because it depends on that policy's `local domains` and `directory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .addresses import Address, AddressError, event_address
from .schema import CLIENT_FIELDS as _CLIENT_TYPES
from .schema import EVENT_KINDS, EVENT_MEMBERS, PROTOCOLS

_KINDS = frozenset(EVENT_KINDS)
_last_time: tuple[str, datetime] | None = None
_new_event = object.__new__
# the members of the event JSON (docs/cli.md) and of its client (policyplug.schema); the keywords of
# Event.message(...) etc. are every member but kind, from and to
EVENT_FIELDS = EVENT_MEMBERS
CLIENT_FIELDS = tuple(_CLIENT_TYPES)
KEYWORD_FIELDS = EVENT_FIELDS[3:]
_ABSENT: Any = (
    object()
)  # a member not given at all (null is not the same: it is refused where a list or object is due)


class EventError(ValueError):
    """An invalid event; the message is one line naming the field."""


def _field_error(name: str, problem: str) -> EventError:
    return EventError(f"field '{name}': {problem}")


def parse_time(value: str, field: str = "time") -> datetime:
    """RFC 3339 text -> aware datetime in UTC. A time without offset is taken as UTC."""
    if not isinstance(value, str):
        raise _field_error(field, f"expected an RFC 3339 string, got {type(value).__name__}")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:  # RFC 3339 5.6: "T" and "Z" may be lower case; fromisoformat wants them upper
            parsed = datetime.fromisoformat(text.upper())
        except ValueError:
            raise _field_error(field, f"not an RFC 3339 time: {value[:60]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is after the last UTC time Python can hold
        raise _field_error(field, f"out of range: {value[:60]!r}") from None


class Event:
    """One event to decide on. Build with Event.message(...) etc. or Event.from_json(...)."""

    __slots__ = (
        "kind",
        "protocol",
        "sender",
        "recipient",
        "body",
        "subject",
        "type",
        "size",
        "payload",
        "headers",
        "client",
        "time",
        "content_complete",
        "_activation_cache",
    )

    def __init__(
        self,
        kind: str,
        sender: Address,
        recipient: Address,
        *,
        protocol: str,
        body: str = "",
        subject: str = "",
        type: str = "",
        size: int | None = None,
        payload: list[str] | None = None,
        headers: dict[str, str] | None = None,
        client: dict[str, Any] | None = None,
        time: datetime | None = None,
        content_complete: bool = True,
    ):
        self.kind = kind
        self.protocol = protocol
        self.sender = sender
        self.recipient = recipient
        self.body = body
        self.subject = subject
        self.type = type
        self.size = len(body.encode("utf-8", "surrogatepass")) if size is None else size
        self.payload = payload if payload is not None else []
        self.headers = headers if headers is not None else {}
        self.client = client if client is not None else {"ip": "", "port": 0, "secure": False}
        self.time = time if time is not None else datetime.now(UTC)
        # False when the adapter could not extract the content (body, subject) fully and was told
        # to ask anyway (docs/language.md): rules may refuse what they could not read
        self.content_complete = content_complete
        # what the last policy to look at this event derived from it (runtime.Policy: its parties,
        # direction, activation dict); set to None to have it derived again
        self._activation_cache: tuple[Any, ...] | None = None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        """The event JSON (docs/cli.md) -> Event; raises EventError naming the first bad field.

        Every service request comes through here, so each field is checked inline for its usual
        shape first (exact types, one dict lookup); anything else goes to the helper that accepts
        the unusual (str subclasses, Mappings, null) or names the problem.
        """
        if type(data) is not dict and not isinstance(data, Mapping):  # dict first: ABC checks are slow
            raise EventError(f"an event must be a JSON object, got {type(data).__name__}")
        get = data.get
        kind = get("kind")
        if type(kind) is not str or kind not in _KINDS:
            if kind is None:
                raise _field_error("kind", "missing")
            if not isinstance(kind, str) or kind not in _KINDS:
                raise _field_error("kind", f"unknown kind {kind!r} (one of {', '.join(EVENT_KINDS)})")
        raw_from = get("from")
        if type(raw_from) is not str or not raw_from or raw_from[0].isspace() or raw_from[-1].isspace():
            raw_from = _required_string(data, "from")
        raw_to = get("to")
        if type(raw_to) is not str or not raw_to or raw_to[0].isspace() or raw_to[-1].isspace():
            raw_to = _required_string(data, "to")
        protocol = get("protocol")
        if protocol is None:
            protocol = "xmpp"
            if (
                (raw_from[0] in "sS" or raw_to[0] in "sS")
                and (  # only then can either be a sip: URI
                    raw_from[:5].lower().startswith(("sip:", "sips:"))
                    or raw_to[:5].lower().startswith(("sip:", "sips:"))
                )
            ):
                protocol = "sip"
        elif protocol not in PROTOCOLS:
            raise _field_error("protocol", f"expected 'xmpp' or 'sip', got {protocol!r}")
        sender = _address(raw_from, "from", protocol)
        recipient = _address(raw_to, "to", protocol)
        body = get("body", "")
        if type(body) is not str:
            body = _optional_string(data, "body")
        subject = get("subject", "")
        if type(subject) is not str:
            subject = _optional_string(data, "subject")
        stanza_type = get("type", "")
        if type(stanza_type) is not str:
            stanza_type = _optional_string(data, "type")
        size = get("size")
        if (
            size is not None
            and (type(size) is not int or size < 0)
            and (not isinstance(size, int) or isinstance(size, bool) or size < 0)
        ):
            raise _field_error("size", f"expected a non-negative integer, got {size!r}")
        payload = get("payload", _ABSENT)
        if payload is _ABSENT:
            payload = []
        elif not isinstance(payload, list) or not all(type(p) is str or isinstance(p, str) for p in payload):
            raise _field_error("payload", "expected a list of strings")
        else:
            payload = list(payload)
        headers = get("headers", _ABSENT)
        if headers is _ABSENT or headers == {}:
            headers = {}
        elif (type(headers) is not dict and not isinstance(headers, Mapping)) or not all(
            type(k) is str and type(v) is str or isinstance(k, str) and isinstance(v, str)
            for k, v in headers.items()
        ):
            raise _field_error("headers", "expected an object of string values")
        else:
            headers = {k.lower(): v for k, v in headers.items()}
        client = get("client")
        if (
            type(client) is dict
            and len(client) == 3
            and type(client.get("ip")) is str
            and type(client.get("port")) is int
            and type(client.get("secure")) is bool
        ):
            client = {
                "ip": client["ip"],
                "port": client["port"],
                "secure": client["secure"],
            }  # the usual shape
        else:
            client = _client(client)
        time_value = get("time")
        if time_value is None:
            when = datetime.now(UTC)
        else:
            last = _last_time
            when = (
                last[1]
                if last is not None and last[0] == time_value and type(time_value) is str
                else _parse_time_cached(time_value)
            )
        if size is None:
            size = len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))
        complete = get("content_complete", True)
        if complete is not True and complete is not False:
            if complete is not None:  # null is the default, like the other optional members
                raise _field_error("content_complete", f"expected true or false, got {complete!r}")
            complete = True
        return cls.from_members(
            kind,
            protocol,
            sender,
            recipient,
            body,
            subject,
            stanza_type,
            size,
            payload,
            headers,
            client,
            when,
            complete,
        )

    @classmethod
    def from_members(
        cls,
        kind: str,
        protocol: str,
        sender: Address,
        recipient: Address,
        body: str,
        subject: str,
        type: str,
        size: int,
        payload: list[str],
        headers: dict[str, str],
        client: dict[str, Any],
        time: datetime,
        content_complete: bool = True,
    ) -> Event:
        """An Event of members already checked and in their final form (from_json's, an adapter's):
        its slots set directly, without __init__'s keyword call and defaults (a fifth of from_json's time)."""
        event = _new_event(cls)
        event.kind = kind
        event.protocol = protocol
        event.sender = sender
        event.recipient = recipient
        event.body = body
        event.subject = subject
        event.type = type
        event.size = size
        event.payload = payload
        event.headers = headers
        event.client = client
        event.time = time
        event.content_complete = content_complete
        event._activation_cache = None
        return event

    @classmethod
    def _of_kind(cls, kind: str, sender: str, recipient: str, fields: dict[str, Any]) -> Event:
        data: dict[str, Any] = {"kind": kind, "from": sender, "to": recipient}
        for key, value in fields.items():
            if key not in KEYWORD_FIELDS:
                # from_json ignores unknown members (adapters may send more); a keyword is a typo
                raise TypeError(
                    f"Event.{kind}() got an unexpected keyword argument {key!r} "
                    f"(event fields: {', '.join(KEYWORD_FIELDS)})"
                )
            if key == "time" and isinstance(value, datetime):
                value = value.isoformat()
            data[key] = value
        return cls.from_json(data)

    @classmethod
    def message(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("message", sender, recipient, fields)

    @classmethod
    def groupchat(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("groupchat", sender, recipient, fields)

    @classmethod
    def presence(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("presence", sender, recipient, fields)

    @classmethod
    def subscribe(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("subscribe", sender, recipient, fields)

    @classmethod
    def join(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("join", sender, recipient, fields)

    @classmethod
    def call(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("call", sender, recipient, fields)

    @classmethod
    def file(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("file", sender, recipient, fields)

    @classmethod
    def login(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("login", sender, recipient, fields)

    @classmethod
    def iq(cls, sender: str, recipient: str, **fields: Any) -> Event:
        return cls._of_kind("iq", sender, recipient, fields)

    # -- output ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The event JSON; `content_complete` only when false (true is its default)."""
        data = {
            "kind": self.kind,
            "from": self.sender.raw,
            "to": self.recipient.raw,
            "body": self.body,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "protocol": self.protocol,
            "client": dict(self.client),
            "headers": dict(self.headers),
            "payload": list(self.payload),
            "type": self.type,
            "subject": self.subject,
            "size": self.size,
        }
        if self.content_complete is not True:
            data["content_complete"] = False
        return data

    def __repr__(self) -> str:
        return f"Event({self.kind} from {self.sender.raw!r} to {self.recipient.raw!r})"


def _required_string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise _field_error(name, "missing")
    if not isinstance(value, str):
        raise _field_error(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _field_error(name, "empty address")
    return value


def _optional_string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _field_error(name, f"expected a string, got {type(value).__name__}")
    return value


def _address(raw: str, field: str, protocol: str) -> Address:
    try:
        return event_address(raw, protocol)
    except AddressError as exc:
        raise _field_error(field, str(exc)) from None


def _parse_time_cached(value: Any) -> datetime:
    """parse_time, remembering the last text: events of the same second carry the same time."""
    global _last_time
    last = _last_time
    if last is not None and last[0] == value and type(value) is str:
        return last[1]
    parsed = parse_time(value)
    _last_time = (value, parsed)
    return parsed


def _client(value: Any) -> dict[str, Any]:
    client = {"ip": "", "port": 0, "secure": False}
    if value is None:
        return client
    if type(value) is not dict and not isinstance(value, Mapping):
        raise _field_error("client", "expected an object {ip, port, secure}")
    for key, expected in (("ip", str), ("port", int), ("secure", bool)):
        if key in value:
            item = value[key]
            ok = isinstance(item, expected) and (expected is bool or not isinstance(item, bool))
            if not ok:
                raise _field_error(f"client.{key}", f"expected {expected.__name__}, got {item!r}")
            client[key] = item
    return client
