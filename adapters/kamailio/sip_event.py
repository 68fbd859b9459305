"""What a SIP request is, in the terms of the rule language: request -> event JSON.

Pure functions over the raw request bytes and what Kamailio parsed already, so they are unit
tested without Kamailio (tests/test_kamailio_events.py) and used unchanged inside it.

    MESSAGE                          -> message (the text body)
    SUBSCRIBE, Event: presence[.*]   -> subscribe
    PUBLISH, NOTIFY                  -> presence
    INVITE                           -> call, or file when its SDP offers an MSRP file transfer
    REGISTER                         -> login
    anything else                    -> None: not a kind of the rule language, not decided
"""

from __future__ import annotations

import re
from typing import Any

# RFC 3261 7.3.3 compact header forms, and a few common extension ones (RFC 3265, 3515, 3841)
COMPACT_NAMES = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length", "c": "content-type",
    "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via", "o": "event", "u": "allow-events",
    "r": "refer-to", "b": "referred-by", "j": "reject-contact", "a": "accept-contact", "d": "request-disposition",
    "x": "session-expires", "y": "identity", "n": "identity-info",
}
MAX_HEADERS = 128          # what the policy sees of a request with more is the first 128
MAX_HEADER_VALUE = 8192    # a longer value is cut (the request itself is relayed unchanged)
PRESENCE_EVENTS = ("presence", "presence.winfo")
SECURE_TRANSPORTS = ("tls", "wss")
TEXT_TYPES = ("text/plain", "text/html", "message/cpim", "")


FOLD = re.compile(r"\r?\n[ \t]+")


def split_message(raw: bytes) -> tuple[str, bytes]:
    """The header section (without the request line, folded lines joined) and the body."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")  # bare LF: tolerated, as Kamailio does
    return _unfolded(head.decode("utf-8", errors="replace")), body


def split_text(raw: str) -> tuple[str, str]:
    """split_message of an ASCII request given as text (what Kamailio hands the script): the
    same header section, and the body as text, without encoding and decoding it again."""
    head, sep, body = raw.partition("\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition("\n\n")
    return _unfolded(head), body


def _unfolded(text: str) -> str:
    if "\n " in text or "\n\t" in text:
        text = FOLD.sub(" ", text)
    return text.partition("\n")[2]


def parse_headers(section: str) -> dict[str, str]:
    """Lower-case (long-form) header names -> values; repeated headers joined with ', '."""
    headers: dict[str, str] = {}
    keys = _KEYS
    for line in section.split("\n", MAX_HEADERS)[:MAX_HEADERS]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = keys.get(name)
        if key is None:
            key = _key(name)
        value = value.strip()
        if len(value) > MAX_HEADER_VALUE:
            value = value[:MAX_HEADER_VALUE]
        if key in headers:
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    return headers


# header name as written -> its key: requests use a few dozen names, each looked up once here
_KEYS: dict[str, str] = {}


def _key(name: str) -> str:
    key = name.strip().lower()
    key = COMPACT_NAMES.get(key, key)
    if len(name) <= 64:
        if len(_KEYS) >= 1024:
            _KEYS.clear()  # a flood of odd names: start afresh rather than grow
        _KEYS[name] = key
    return key


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def offers_msrp_file_transfer(sdp: str) -> bool:
    """RFC 5547: an MSRP media line (m=message ... TCP/MSRP) with a file-selector attribute."""
    lowered = sdp.lower()
    return "m=message" in lowered and "msrp" in lowered and "a=file-selector" in lowered


def kind_of(method: str, headers: dict[str, str], body_text: str) -> str | None:
    if method == "MESSAGE":
        return "message"
    if method == "SUBSCRIBE":
        event = headers.get("event", "").split(";", 1)[0].strip().lower()
        return "subscribe" if event in PRESENCE_EVENTS else None
    if method in ("PUBLISH", "NOTIFY"):
        return "presence"
    if method == "INVITE":
        if media_type(headers.get("content-type", "")) == "application/sdp" and offers_msrp_file_transfer(body_text):
            return "file"
        return "call"
    if method == "REGISTER":
        return "login"
    return None


def message_sections(raw: bytes | str) -> tuple[str, str, int]:
    """(header section without the request line, folded lines joined; body as text; size in
    bytes) of a request given as its bytes, or as its text when it is ASCII (the same result
    either way)."""
    if isinstance(raw, str) and not raw.isascii():
        raw = raw.encode("utf-8", "surrogatepass")
    if isinstance(raw, str):  # ASCII: its length is its size in bytes
        section, body_text = split_text(raw)
    else:
        section, body = split_message(raw)
        body_text = body.decode("utf-8", errors="replace")
    return section, body_text, len(raw)


def all_headers_parsed(section: str) -> bool:
    """Does parse_headers(section) see every header (not only the first MAX_HEADERS lines)?"""
    return section.count("\n") < MAX_HEADERS


def event_parts(method: str, headers: dict[str, str], body_text: str,
                size: int) -> tuple[str, str, str, int, list[str], dict[str, str]] | None:
    """request_parts of a request already split (message_sections) and its headers parsed."""
    kind = kind_of(method, headers, body_text)
    if kind is None:
        return None
    content_type = headers.get("content-type", "")
    payload = [content_type] if content_type else []
    event_header = headers.get("event", "")
    if event_header:
        payload.append(event_header)
    # the message text is what a person wrote: the body of a MESSAGE of a textual type
    text = body_text if kind == "message" and media_type(content_type) in TEXT_TYPES else ""
    return kind, text, headers.get("subject", ""), size, payload, headers


def request_parts(method: str, raw: bytes | str) -> tuple[str, str, str, int, list[str], dict[str, str]] | None:
    """(kind, body, subject, size, payload, headers) of a request as its event has them, or None
    when its method is not decided. `raw` is the request's bytes, or its text when it is ASCII
    (the same result either way)."""
    section, body_text, size = message_sections(raw)
    return event_parts(method, parse_headers(section), body_text, size)


def client_of(source_ip: str, source_port: int, transport: str) -> dict[str, Any]:
    return {"ip": source_ip, "port": source_port, "secure": transport.lower() in SECURE_TRANSPORTS}


def event_json(*, method: str, raw: bytes | str, from_uri: str | None, to_uri: str | None, source_ip: str,
               source_port: int, transport: str, time: str | None = None) -> dict[str, Any] | None:
    """The event JSON (shared/spec/cli.md) of a request, or None when its method is not decided.

    `raw` is the request's bytes, or its text when it is ASCII (the same result either way).
    `from_uri` is the From URI and `to_uri` the Request-URI, both as Kamailio parsed them (None
    when missing or unparsable: the caller refuses the request with 400 before asking). The
    recipient is the Request-URI, not the To header: it is where the request will be routed, so
    a To header naming someone else cannot get a request past a rule."""
    parts = request_parts(method, raw)
    if parts is None:
        return None
    kind, text, subject, size, payload, headers = parts
    event: dict[str, Any] = {
        "kind": kind, "from": from_uri, "to": to_uri, "protocol": "sip",
        "body": text, "subject": subject, "type": method, "size": size,
        "payload": payload, "headers": headers, "client": client_of(source_ip, source_port, transport),
    }
    if time is not None:
        event["time"] = time
    return event
