"""What a SIP request is, in the terms of the rule language: request -> event JSON.

Pure functions over the raw request bytes and what Kamailio parsed already, so they are unit
tested without Kamailio (tests/test_kamailio_events.py) and used unchanged inside it.

    MESSAGE                          -> message (the text body)
    SUBSCRIBE, Event: presence[.*]   -> subscribe
    PUBLISH, NOTIFY                  -> presence
    INVITE                           -> call, or file when its SDP offers an MSRP file transfer
    REGISTER                         -> login
    anything else                    -> None: not a kind of the rule language, not decided

A MESSAGE's `body` is every text its recipient can be shown (docs/kamailio.md, "The message
text"): message_text() extracts it from text/*, multipart/* and message/cpim bodies, or says
why it cannot (Unreadable), and a request whose headers contradict each other is refused
(Conflict) rather than read one way here and another way by the recipient.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import quopri
import re
from typing import Any

# RFC 3261 7.3.3 compact header forms, and a few common extension ones (RFC 3265, 3515, 3841)
COMPACT_NAMES = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "j": "reject-contact",
    "a": "accept-contact",
    "d": "request-disposition",
    "x": "session-expires",
    "y": "identity",
    "n": "identity-info",
}
MAX_HEADERS = 128  # what the policy sees of a request with more is the first 128
MAX_HEADER_VALUE = 8192  # a longer value is cut (the request itself is relayed unchanged)
PRESENCE_EVENTS = ("presence", "presence.winfo")
SECURE_TRANSPORTS = ("tls", "wss")


FOLD = re.compile(r"\r?\n[ \t]+")


def _header_end(raw: Any, crlf: Any, lf: Any) -> tuple[int, int]:
    """(end of the header section, start of the body): at the first empty line, whichever line
    ending it uses (Kamailio's parser takes CRLF and bare LF alike, so a request cannot hide a
    header section behind a bare-LF empty line ahead of a CRLF one)."""
    crlf_at = raw.find(crlf)  # "\n\r\n": a line, then an empty CRLF line
    lf_at = raw.find(lf, 0, crlf_at if crlf_at >= 0 else len(raw))  # "\n\n" before it
    if lf_at >= 0:
        return lf_at, lf_at + 2
    if crlf_at >= 0:
        return (crlf_at - 1 if raw[crlf_at - 1 : crlf_at] in ("\r", b"\r") else crlf_at), crlf_at + 3
    return len(raw), len(raw)


def split_message(raw: bytes) -> tuple[str, bytes]:
    """The header section (without the request line, folded lines joined) and the body."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or b"\n\n" in head or b"\n\r\n" in head or head.endswith(b"\n"):  # a bare LF first
        end, body_at = _header_end(raw, b"\n\r\n", b"\n\n")
        head, body = raw[:end], raw[body_at:]
    return _unfolded(head.decode("utf-8", errors="replace")), body


def split_text(raw: str) -> tuple[str, str]:
    """split_message of an ASCII request given as text (what Kamailio hands the script): the
    same header section, and the body as text, without encoding and decoding it again."""
    head, sep, body = raw.partition("\r\n\r\n")
    if not sep or "\n\n" in head or "\n\r\n" in head or head.endswith("\n"):  # a bare LF first
        end, body_at = _header_end(raw, "\n\r\n", "\n\n")
        head, body = raw[:end], raw[body_at:]
    return _unfolded(head), body


def _unfolded(text: str) -> str:
    if "\n " in text or "\n\t" in text:
        text = FOLD.sub(" ", text)
    return text.partition("\n")[2]


def parse_headers(section: str, repeated: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Lower-case (long-form) header names -> values; repeated headers joined with ', ' (and, when
    `repeated` is given, each value of a repeated header kept there, in order)."""
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
            if repeated is not None:
                repeated.setdefault(key, [headers[key]]).append(value)
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


# -- the message text ------------------------------------------------------------------------------
#
# `body` of a MESSAGE is every text its recipient can be shown, joined by "\n" in the order of the
# request (docs/kamailio.md, "The message text"). Whatever cannot be read with certainty raises
# Unreadable (the operator's `unreadable_content` setting says what then); headers that contradict
# each other raise Conflict (the request is refused: the recipient might read it either way).

MAX_DEPTH = 8  # nested multipart / message/cpim levels
MAX_PARTS = 64  # body parts in one request, at every level together
MAX_BODY_BYTES = 1 << 20  # a larger MESSAGE body is not read
BINARY_ENCODINGS = ("", "7bit", "8bit", "binary")
# Content-Type values of ASCII text read as it is (no charset to apply), looked up before parsing
PLAIN_TYPES = frozenset(
    (
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "text/plain; charset=UTF-8",
        "text/plain;charset=utf-8",
        "text/plain;charset=UTF-8",
    )
)
_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+"
_MEDIA = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})\s*")
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*(?:({_TOKEN})|"((?:[^"\\\r\n]|\\.)*)")\s*')


class Unreadable(ValueError):
    """The text of a body cannot be extracted with certainty (why, in a few words); `text` is what
    could be read before that."""

    text = ""


class Conflict(ValueError):
    """The request's headers contradict each other about its body (why, in a few words)."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """'Text/Plain; charset="UTF-8"' -> ("text/plain", {"charset": "UTF-8"}), by RFC 2045's grammar;
    a value that does not follow it, or names a parameter twice, is Unreadable."""
    match = _MEDIA.match(value)
    if match is None:
        raise Unreadable(f"malformed Content-Type {value[:80]!r}")
    params: dict[str, str] = {}
    at = match.end()
    while at < len(value):
        param = _PARAM.match(value, at)
        if param is None:
            raise Unreadable(f"malformed Content-Type {value[:80]!r}")
        name = param.group(1).lower()
        if name in params:
            raise Unreadable(f"Content-Type names {name!r} twice")
        quoted_value = param.group(3)
        params[name] = param.group(2) if quoted_value is None else re.sub(r"\\(.)", r"\1", quoted_value)
        at = param.end()
    return f"{match.group(1)}/{match.group(2)}".lower(), params


def _charset(params: dict[str, str]) -> str:
    """The Python codec of a text part's charset (RFC 3261: UTF-8 when not given); Unreadable
    when Python knows no text codec of that name."""
    name = params.get("charset", "utf-8").strip().lower()
    if name in ("utf-8", "utf8", "us-ascii", "ascii"):
        return "utf-8"
    found = _CHARSETS.get(name, False)
    if found is False:
        # looked up once per name, unknown ones too (codecs tries an import for each): a flood of
        # made-up charsets costs a dict lookup each, not a search of the file system
        try:
            info = codecs.lookup(name) if len(name) <= 40 else None
        except LookupError:
            info = None
        # rot13, base64_codec ...: codecs, but not charsets
        found = info.name if info is not None and getattr(info, "_is_text_encoding", True) else None
        if len(_CHARSETS) >= 256:
            _CHARSETS.clear()
        _CHARSETS[name] = found
    if found is None:
        raise Unreadable(f"unknown charset {name[:40]!r}")
    return found


_CHARSETS: dict[str, str | None] = {}  # charset name -> Python codec, None for unknown


def _decoded(data: bytes, charset: str) -> str:
    """A text part's text. UTF-8 (declared or by default) that starts with a UTF-16 or UTF-32
    byte order mark is read by the mark, as clients that sniff it show it; UTF-8 with NUL bytes
    has an encoding in doubt (UTF-16 without a mark, to a client that guesses): Unreadable."""
    if charset == "utf-8":
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode(
                "utf-32" if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) else "utf-16",
                errors="replace",
            )
        if data.startswith(b"\x00\x00\xfe\xff"):
            return data.decode("utf-32", errors="replace")
        if b"\x00" in data:
            raise Unreadable("NUL bytes in a text part")
    return data.decode(charset, errors="replace")


_HTML_BREAKS = frozenset(
    ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre")
)
_HTML_TAG_NAME = re.compile(r"\s*/?\s*([A-Za-z][A-Za-z0-9-]*)")
_HTML_SHOWN_ATTRIBUTE = re.compile(
    r"""\b(?:alt|title|href|src)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I
)
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


def html_text(source: str) -> str:
    """The text of an HTML part as a reader sees it: text between tags with character references
    resolved and white space collapsed (`4111<b>1111</b>` is `41111111`), line breaks for block
    elements, then the attribute texts a client shows (alt, title) or opens (href, src). Linear in
    the source (Python's html.parser takes quadratic time on some malformed input and raises on
    some): comments and what is not closed stay text, which is more than a browser shows, never less."""
    texts: list[str] = []
    extras: list[str] = []
    at, end = 0, len(source)
    while at < end:
        opening = source.find("<", at)
        if opening < 0:
            texts.append(_HTML_SPACE.sub(" ", html.unescape(source[at:])))
            break
        texts.append(_HTML_SPACE.sub(" ", html.unescape(source[at:opening])))
        closing = source.find(">", opening + 1)
        if closing < 0:  # never closed: a client may show it as text
            texts.append(_HTML_SPACE.sub(" ", html.unescape(source[opening:])))
            break
        tag = source[opening + 1 : closing]
        name = _HTML_TAG_NAME.match(tag)
        if name is None:  # "<!-- ... -->", "<!doctype>", "< 3": kept as text
            texts.append(_HTML_SPACE.sub(" ", html.unescape(source[opening : closing + 1])))
        else:
            if name.group(1).lower() in _HTML_BREAKS and not tag.lstrip().startswith("/"):
                texts.append("\n")
            for found in _HTML_SHOWN_ATTRIBUTE.finditer(tag):
                value = next(v for v in found.groups() if v is not None)
                if value:
                    extras.append(html.unescape(value))
        at = closing + 1
    return "\n".join(
        part
        for part in ["\n".join(line.strip() for line in "".join(texts).split("\n")).strip("\n"), *extras]
        if part
    )


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in BINARY_ENCODINGS:
        return data
    if encoding == "base64":
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", data), validate=True)
        except (binascii.Error, ValueError):
            raise Unreadable("malformed base64 part") from None
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    raise Unreadable(f"unknown Content-Transfer-Encoding {encoding[:40]!r}")


def _single(
    headers: dict[str, str], repeated: dict[str, list[str]], name: str, error: type[ValueError]
) -> str:
    """A header that may appear once: its value; the same value repeated is that value; different
    values raise `error`."""
    values = repeated.get(name)
    if values and len({" ".join(v.split()).lower() for v in values}) > 1:
        raise error(f"{len(values)} different {name} headers")
    return values[0] if values else headers.get(name, "")


def _check_content_encoding(headers: dict[str, str]) -> None:
    encoding = headers.get("content-encoding", "")
    if encoding and any(token.strip().lower() not in ("", "identity") for token in encoding.split(",")):
        raise Unreadable(f"Content-Encoding {encoding[:40]!r}")


def _entity_split(data: bytes) -> tuple[bytes, bytes]:
    """(header section, content) of a MIME entity: split at its first empty line (there may be no
    header lines at all); none at all is Unreadable."""
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2 if data.startswith(b"\r\n") else 1 :]
    end, body_at = _header_end(data, b"\n\r\n", b"\n\n")
    if end == len(data):
        raise Unreadable("a body part without an empty line after its headers")
    return data[:end], data[body_at:]


def _entity_headers(section: bytes) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A body part's headers. Every line must be one: text a parser would take for a header
    here may be body text to a more lenient client."""
    repeated: dict[str, list[str]] = {}
    if not section:
        return {}, repeated
    text = _unfolded("\n" + section.decode("utf-8", errors="replace"))  # _unfolded drops a first line
    for line in text.split("\n"):
        name, colon, _value = line.partition(":")
        if not colon or not re.fullmatch(r"\s*[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+\s*", name):
            raise Unreadable("a body part's header section holds a line that is not a header")
    return parse_headers(text, repeated), repeated


class _Extraction:
    """One body's texts, walked depth first with its caps."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.subjects: list[str] = []
        self.parts = 0

    def entity(self, content_type: str, transfer: str, data: bytes, depth: int) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Unreadable(f"more than {MAX_PARTS} body parts")
        if depth > MAX_DEPTH:
            raise Unreadable(f"body parts nested deeper than {MAX_DEPTH}")
        media, params = parse_content_type(content_type) if content_type.strip() else ("text/plain", {})
        data = _decode_transfer(data, transfer)
        if media.startswith("text/") or media == "application/xhtml+xml":
            text = _decoded(data, _charset(params))
            if media in ("text/html", "application/xhtml+xml"):
                text = html_text(text)
            self.texts.append(text)
        elif media.startswith("multipart/"):
            self.multipart(params.get("boundary", ""), data, depth)
        elif media == "message/cpim":
            self.cpim(data, depth)
        # any other type (images, application/*, message/sipfrag ...) is not text a person reads

    def mime_entity(self, data: bytes, depth: int) -> None:
        """A MIME entity: its headers, an empty line, its content (a body part, CPIM's payload)."""
        section, content = _entity_split(data)
        headers, repeated = _entity_headers(section)
        _check_content_encoding(headers)
        content_type = _single(headers, repeated, "content-type", Unreadable)
        transfer = _single(headers, repeated, "content-transfer-encoding", Unreadable)
        self.entity(content_type, transfer, content, depth)

    def multipart(self, boundary: str, data: bytes, depth: int) -> None:
        """RFC 2046 5.1: the parts between delimiter lines (the line break before a delimiter
        belongs to it). A line that starts with the delimiter but is not one is a part boundary
        clients disagree on (RFC 2046 forbids it): Unreadable. Preamble and epilogue are text too:
        a client that does not know multipart shows the body as it is."""
        if not 1 <= len(boundary) <= 70:
            raise Unreadable("multipart without a valid boundary")
        delimiter = re.compile(
            rb"(?:\A|\r?\n)--"
            + re.escape(boundary.encode("utf-8", "surrogateescape"))
            + rb"([^\r\n]*)(?=\r?\n|\Z)"
        )
        parts: list[bytes] = []
        preamble = epilogue = b""
        previous: re.Match[bytes] | None = None
        closed = False
        for found in delimiter.finditer(data):
            rest = found.group(1).rstrip(b" \t")
            if rest not in (b"", b"--"):
                raise Unreadable("a line that starts with the multipart boundary but is not a delimiter")
            if previous is None:
                preamble = data[: found.start()]
            else:
                parts.append(data[previous.end() : found.start()])
            previous = found
            if rest == b"--":
                closed = True
                epilogue = data[found.end() :]
                break
        if previous is None:
            raise Unreadable("multipart without a delimiter")
        if not closed:
            parts.append(data[previous.end() :])  # read, for "decide"; then refused as unreadable
        if preamble.strip():
            self.texts.append(preamble.decode("utf-8", errors="replace").strip())
        for part in parts:
            part = part[2:] if part.startswith(b"\r\n") else part[1:]  # the delimiter line's own line break
            if part:
                self.mime_entity(part, depth + 1)
        if epilogue.strip():
            self.texts.append(epilogue.decode("utf-8", errors="replace").strip())
        if not closed:
            raise Unreadable("multipart without its closing delimiter")

    def cpim(self, data: bytes, depth: int) -> None:
        """RFC 3862: the message headers (their Subjects are shown), an empty line, then the MIME
        entity that carries the content."""
        section, content = _entity_split(data)
        headers, repeated = _entity_headers(section)
        for subject in repeated.get("subject") or ([headers["subject"]] if "subject" in headers else []):
            # "Subject:;lang=fr text": the language parameter is not text
            self.subjects.append(re.sub(r"^;\s*lang=\S*\s*", "", subject))
        self.mime_entity(content, depth + 1)


def message_text(
    headers: dict[str, str], repeated: dict[str, list[str]], body: str | bytes, *, all_headers: bool = True
) -> tuple[str, list[str]]:
    """(the text a MESSAGE's recipient can be shown, the subjects inside it (message/cpim)).

    `headers` and `repeated` are parse_headers' result for the request, `body` its body (text when
    the request is ASCII). Raises Conflict for Content-Type headers that differ, Unreadable for
    a body whose text cannot be extracted with certainty (see the module's doc)."""
    if not all_headers:
        raise Unreadable(f"more than {MAX_HEADERS} header lines")
    content_type = headers.get("content-type", "")
    if (
        content_type in PLAIN_TYPES
        and isinstance(body, str)
        and "content-type" not in repeated
        and "content-encoding" not in headers
        and "content-transfer-encoding" not in headers
        and "\x00" not in body
    ):
        return body, []  # the common case: ASCII text/plain, read as it is
    content_type = _single(headers, repeated, "content-type", Conflict)
    _check_content_encoding(headers)
    transfer = _single(headers, repeated, "content-transfer-encoding", Conflict)
    if len(content_type) >= MAX_HEADER_VALUE:
        raise Unreadable("Content-Type too long")
    media = content_type.split(";", 1)[0].strip().lower()
    if (
        isinstance(body, str)
        and not transfer
        and "\x00" not in body
        and (
            media in ("text/plain", "")
            and (";" not in content_type or _charset(parse_content_type(content_type)[1]) == "utf-8")
        )
    ):
        return body, []  # the common case: ASCII text, read as it is
    data = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body
    if len(data) > MAX_BODY_BYTES:
        raise Unreadable(f"body larger than {MAX_BODY_BYTES} bytes")
    extraction = _Extraction()
    try:
        extraction.entity(content_type, transfer, data, 0)
    except Unreadable as exc:
        exc.text = "\n".join(extraction.texts)  # what could be read before it: decided on under "decide"
        raise
    return "\n".join(extraction.texts), extraction.subjects


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
        if media_type(headers.get("content-type", "")) == "application/sdp" and offers_msrp_file_transfer(
            body_text
        ):
            return "file"
        return "call"
    if method == "REGISTER":
        return "login"
    return None


def message_sections(raw: bytes | str) -> tuple[str, str | bytes, int]:
    """(header section without the request line, folded lines joined; body; size in bytes) of a
    request given as its bytes, or as its text when it is ASCII. The body is text when the
    request is ASCII text, else bytes (body_text() makes text of either)."""
    if isinstance(raw, str) and not raw.isascii():
        raw = raw.encode("utf-8", "surrogatepass")
    if isinstance(raw, str):  # ASCII: its length is its size in bytes
        section, body = split_text(raw)
        return section, body, len(raw)
    section, body_bytes = split_message(raw)
    return section, body_bytes, len(raw)


def body_text(body: str | bytes) -> str:
    return body if isinstance(body, str) else body.decode("utf-8", errors="replace")


def all_headers_parsed(section: str) -> bool:
    """Does parse_headers(section) see every header (not only the first MAX_HEADERS lines)?"""
    return section.count("\n") < MAX_HEADERS


Parts = tuple[str, str, str, int, list[str], dict[str, str], "Unreadable | Conflict | None"]


def event_parts(
    method: str,
    headers: dict[str, str],
    body: str | bytes,
    size: int,
    repeated: dict[str, list[str]] | None = None,
    *,
    all_headers: bool = True,
    read_text: bool = True,
) -> Parts | None:
    """request_parts of a request already split (message_sections) and its headers parsed
    (`repeated`: parse_headers' values of repeated headers; `all_headers`: all_headers_parsed).
    `read_text` False leaves a MESSAGE's text unread (a policy that reads neither body nor
    subject, and no audit record that keeps bodies)."""
    kind = kind_of(method, headers, body if method != "INVITE" else body_text(body))
    if kind is None:
        return None
    content_type = headers.get("content-type", "")
    payload = [content_type] if content_type else []
    event_header = headers.get("event", "")
    if event_header:
        payload.append(event_header)
    subject = headers.get("subject", "")
    text = ""
    problem: Unreadable | Conflict | None = None
    if kind == "message" and read_text:
        # the message text is every text its recipient can be shown (message_text)
        try:
            text, subjects = message_text(headers, repeated or {}, body, all_headers=all_headers)
            if subjects:
                subject = "\n".join([subject, *subjects] if subject else subjects)
        except (Unreadable, Conflict) as exc:
            problem = exc
            text = exc.text if isinstance(exc, Unreadable) else ""
    return kind, text, subject, size, payload, headers, problem


def request_parts(method: str, raw: bytes | str) -> Parts | None:
    """(kind, body, subject, size, payload, headers, problem) of a request as its event has them,
    or None when its method is not decided; `problem` says why the text could not be extracted
    (Unreadable) or why the request is malformed (Conflict). `raw` is the request's bytes, or its
    text when it is ASCII (the same result either way)."""
    section, body, size = message_sections(raw)
    repeated: dict[str, list[str]] = {}
    return event_parts(
        method,
        parse_headers(section, repeated),
        body,
        size,
        repeated,
        all_headers=all_headers_parsed(section),
    )


def client_of(source_ip: str, source_port: int, transport: str) -> dict[str, Any]:
    return {"ip": source_ip, "port": source_port, "secure": transport.lower() in SECURE_TRANSPORTS}


def event_json(
    *,
    method: str,
    raw: bytes | str,
    from_uri: str | None,
    to_uri: str | None,
    source_ip: str,
    source_port: int,
    transport: str,
    time: str | None = None,
    unreadable_content: str = "decide",
) -> dict[str, Any] | None:
    """The event JSON (docs/cli.md) of a request, or None when its method is not decided.

    `raw` is the request's bytes, or its text when it is ASCII (the same result either way).
    `from_uri` is the From URI and `to_uri` the Request-URI, both as Kamailio parsed them (None
    when missing or unparsable: the caller refuses the request with 400 before asking). The
    recipient is the Request-URI, not the To header: it is where the request will be routed, so
    a To header naming someone else cannot get a request past a rule.

    A MESSAGE whose headers contradict each other raises Conflict. One whose text cannot be
    extracted with certainty raises Unreadable when `unreadable_content` is "refuse", and has
    `"content_complete": false` (and the text that could be read, if any) when it is "decide"."""
    parts = request_parts(method, raw)
    if parts is None:
        return None
    kind, text, subject, size, payload, headers, problem = parts
    if isinstance(problem, Conflict) or (problem is not None and unreadable_content == "refuse"):
        raise problem
    event: dict[str, Any] = {
        "kind": kind,
        "from": from_uri,
        "to": to_uri,
        "protocol": "sip",
        "body": text,
        "subject": subject,
        "type": method,
        "size": size,
        "payload": payload,
        "headers": headers,
        "client": client_of(source_ip, source_port, transport),
    }
    if problem is not None:
        event["content_complete"] = False
    if time is not None:
        event["time"] = time
    return event
