"""Address normalisation: what a rule sees of `from` and `to`.

XMPP JIDs follow RFC 7622: the localpart is PRECIS UsernameCaseMapped (case-folded, width-mapped),
the domainpart lower-cased and IDNA-mapped (UTS 46), the resource PRECIS OpaqueString. SIP and
SIPS URIs follow RFC 3261: scheme and host lower-cased, percent-escapes decoded, password, port,
parameters and headers dropped from `address`, escapes decoded, so `sip:%61lice@acme.example`
is `alice@acme.example`. RFC 3261 compares SIP user parts case-sensitively; we lower-case them
anyway, because the rule language promises that a policy never has to guess the case of an
address (`sip:Alice@acme.example` must not slip past a rule about `alice@acme.example`). Domains are kept in their Unicode form (U-labels), so `bücher.example`
and `xn--bcher-kva.example` are the same domain to a policy.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import unquote

import idna
from precis_i18n import get_profile

MAX_PART_OCTETS = 1023
# Fast path: plain ASCII parts that PRECIS and IDNA leave as they are, apart from case.
_SIMPLE_LOCAL = re.compile(r"^[A-Za-z0-9._+\-=!$%*?^`{|}~]+\Z")  # \Z: `$` also matches before a final newline
_SIMPLE_DOMAIN = re.compile(
    r"^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$"
)
_SIMPLE_RESOURCE = re.compile(r"^[\x21-\x7e ]+\Z")
_FORBIDDEN_LOCAL = set("\"&'/:<>@ ")
_USERNAME = get_profile("UsernameCaseMapped")
_OPAQUE = get_profile("OpaqueString")


class AddressError(ValueError):
    """An address that cannot be normalised; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Address:
    protocol: str  # "xmpp" | "sip"
    scheme: str  # "xmpp" | "sip" | "sips"
    address: str  # normalised bare address: "user@domain", or "domain"
    user: str
    domain: str
    resource: str
    raw: str
    # address and resource in one string (NUL cannot occur in either): what a policy caches
    # per party under, computed once here rather than on every decision
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.address}\x00{self.resource}")


# The characters UTS 46 maps to '.' (label separators): IDNA's own mapping applies them, this set
# only lets list entries spelled with them be recognised as domains (a test derives it from idna).
DOT_LIKES = "\u3002\uff0e\uff61"


def normalise_domain(text: str) -> str:
    """Lower-case, UTS 46 / IDNA2008 mapping to Unicode labels; IP literals kept.

    Total and idempotent: UTS 46 maps first (case, width, the dot-likes of DOT_LIKES), then one
    trailing dot (a fully qualified name) is dropped; an empty label anywhere (`a..b`, a second
    trailing dot, a leading dot) is an error, never a near miss of the domain it resembles."""
    domain = text.strip()
    if domain and not domain.isascii():
        try:
            domain = idna.uts46_remap(domain, std3_rules=False, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise AddressError(f"bad domain {domain[:80]!r}: {exc}") from None
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        raise AddressError("empty domain")
    if _SIMPLE_DOMAIN.match(domain) and "xn--" not in domain.lower():
        return domain.lower()
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"bad IPv6 literal {domain!r}")
        try:
            return "[" + str(ipaddress.IPv6Address(domain[1:-1])) + "]"
        except ValueError:
            raise AddressError(f"bad IPv6 literal {domain!r}") from None
    try:
        ipaddress.IPv4Address(domain)
        return domain
    except ValueError:
        pass
    if "" in domain.split("."):
        raise AddressError(f"bad domain {text.strip()[:80]!r}: empty label")
    try:
        ascii_form = idna.encode(domain, uts46=True, transitional=False)
        return idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise AddressError(f"bad domain {domain[:80]!r}: {exc}") from None


def _localpart(text: str) -> str:
    if _SIMPLE_LOCAL.match(text):
        return text.lower()
    if any(c in _FORBIDDEN_LOCAL for c in text):
        raise AddressError(f"forbidden character in localpart {text[:80]!r}")
    try:
        return _USERNAME.enforce(text)
    except UnicodeEncodeError as exc:
        raise AddressError(f"bad localpart {text[:80]!r}: {exc.reason}") from None


def _resource(text: str) -> str:
    if _SIMPLE_RESOURCE.match(text):
        return text
    try:
        return _OPAQUE.enforce(text)
    except UnicodeEncodeError as exc:
        raise AddressError(f"bad resource {text[:80]!r}: {exc.reason}") from None


def _check_length(part: str, what: str) -> None:
    if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_OCTETS:
        raise AddressError(f"{what} longer than {MAX_PART_OCTETS} octets")


@lru_cache(maxsize=65536)
def _parse_jid(raw: str) -> Address:
    text = raw.strip()
    if text.lower().startswith("xmpp:"):
        text = unquote(text[5:].split("?", 1)[0])
        if "\x00" in text:
            raise AddressError("NUL character in address")
    if not text:
        raise AddressError("empty address")
    # RFC 7622 §3.1: the resource starts at the first '/', the localpart ends at the first '@' before it.
    bare, slash, resource = text.partition("/")
    if slash and not resource:
        raise AddressError("empty resource after '/'")
    user, at, domain = bare.partition("@") if "@" in bare else ("", "", bare)
    if at and not user:
        raise AddressError("empty localpart before '@'")
    _check_length(user, "localpart")
    _check_length(domain, "domain")
    _check_length(resource, "resource")
    user = _localpart(user) if user else ""
    domain = normalise_domain(domain)
    resource = _resource(resource) if resource else ""
    return Address("xmpp", "xmpp", f"{user}@{domain}" if user else domain, user, domain, resource, raw)


# RFC 3261 name-addr: [display-name] "<" addr-spec ">" and header parameters. The display name
# is a quoted string or tokens (no ':', '@', ';', '<'...), so `sip:eve@evil.example;x=<sip:...>`
# is not taken for a display name with the URI in brackets behind it.
_NAME_ADDR = re.compile(
    r'\s*(?:"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00\x0a\x0d])*"'
    r"|[A-Za-z0-9\-.!%*_+`'~ \t\u0080-\U0010ffff]*)\s*<([^<>\"]*)>\s*(?:;[^<>\"]*)?"
)
# what an addr-spec (a URI outside brackets) cannot hold: RFC 3261 escapes all of these
_URI_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>"]')
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# characters that, decoded from an escape, would split a SIP user again when its normal form is read
# (';' user parameters, ':' password, '?' headers, '%' an escape): such a user has no normal form
_USER_SPLITTERS = frozenset("%;:?")


def _split_sip(raw: str) -> tuple[str, str, str, str, str]:
    """A SIP URI (or name-addr) in its parts: (scheme, userinfo, "@" or "", host[:port][;uri-parameters],
    "?headers" or ""). Raises AddressError for text that is neither (a URI with '<', '>', '"',
    whitespace or control characters outside a name-addr's brackets, or a name-addr with trailing text)."""
    text = raw.strip()
    if "<" in text or ">" in text or '"' in text:
        match = _NAME_ADDR.fullmatch(text)
        if match is None:
            raise AddressError(f"not a SIP URI or name-addr: {raw[:80]!r}")
        text = match.group(1).strip()  # '"Alice" <sip:alice@acme.example>;tag=1' -> the URI in the brackets
    if _URI_FORBIDDEN.search(text):
        raise AddressError(f"bad character in SIP URI {raw[:80]!r}")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        if ":" not in text or "@" in text.split(":", 1)[0]:
            scheme, rest = "sip", text  # a bare user@host given with protocol "sip"
        else:
            raise AddressError(f"not a SIP URI: {raw[:80]!r}")
    rest, question, headers = rest.partition("?")
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        userinfo, hostport = "", rest
    return scheme, userinfo, at, hostport, question + headers


def sip_uri_suffix(raw: str) -> str:
    """What a SIP URI says after its host and `Address.address` leaves out: the port, the
    ;uri-parameters and the ?headers, lower-cased ("" when there are none)."""
    _scheme, _userinfo, _at, hostport, headers = _split_sip(raw)
    hostport, semicolon, parameters = hostport.partition(";")
    if hostport.startswith("["):
        port = hostport[hostport.find("]") + 1 :] if "]" in hostport else ""
    else:
        port = ":" + hostport.rsplit(":", 1)[1] if hostport.count(":") == 1 else ""
    return (port + semicolon + parameters + headers).lower()


def _sip_user(userinfo: str) -> str:
    """The user of a SIP userinfo in its normal form: user parameters (telephone-subscriber) and
    password dropped, escapes decoded, lower-cased. An escape that decodes to `%`, `;`, `:` or `?`
    is an error: decoded, the user would read back as another one (the form must be a fixpoint)."""
    user = userinfo.split(";", 1)[0].split(":", 1)[0]
    if "%" in user:
        if _BAD_ESCAPE.search(user):
            raise AddressError(f"bad escape in SIP user {userinfo[:80]!r}")
        try:
            user = unquote(user, errors="strict")
        except UnicodeDecodeError:
            raise AddressError(f"bad escape in SIP user {userinfo[:80]!r}") from None
        if "\x00" in user:
            raise AddressError("NUL character in SIP user")
        if not _USER_SPLITTERS.isdisjoint(user):
            raise AddressError(f"escaped '%', ';', ':' or '?' in SIP user {userinfo[:80]!r}")
    if not (user.isascii() and user.isprintable()) or " " in user:
        for c in user:
            if c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn"):
                raise AddressError(f"whitespace, control or format character U+{ord(c):04X} in SIP user")
    if any(c in '<>"' for c in user):
        raise AddressError(f"bad character in SIP user {userinfo[:80]!r}")
    return user.lower()


@lru_cache(maxsize=65536)
def _parse_sip(raw: str) -> Address:
    scheme, userinfo, at, hostport, _headers = _split_sip(raw)
    hostport, _semicolon, parameters = hostport.partition(";")
    if parameters and any(p.split("=", 1)[0].strip().lower() == "maddr" for p in parameters.split(";")):
        # RFC 3261 19.1.1: a proxy sends the request to the maddr host, not to the host the rules see
        raise AddressError(f"maddr parameter in SIP URI {raw[:80]!r}: it routes to another host")
    user = _sip_user(userinfo)
    if at and not user:
        raise AddressError("empty user before '@'")
    if hostport.startswith("["):
        host = hostport[: hostport.find("]") + 1] if "]" in hostport else hostport
    else:
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
        port = hostport.rsplit(":", 1)[1] if hostport.count(":") == 1 else ""
        if port and not port.isdigit():
            raise AddressError(f"bad port in SIP URI {raw[:80]!r}")
    if not host:
        raise AddressError(f"no host in SIP URI {raw[:80]!r}")
    if "%" in host:  # RFC 3261 hosts have no escapes; a proxy would not decode them either
        raise AddressError(f"escape in SIP host {raw[:80]!r}")
    _check_length(user, "SIP user")
    _check_length(host, "SIP host")
    domain = normalise_domain(host)
    return Address("sip", scheme, f"{user}@{domain}" if user else domain, user, domain, "", raw)


def parse_address(raw: str, protocol: str | None = None) -> Address:
    """Normalise a JID or SIP URI. `protocol` None: 'sip:'/'sips:' means SIP, anything else a JID."""
    if not isinstance(raw, str):
        raise AddressError("address must be a string")
    if "\x00" in raw:
        raise AddressError("NUL character in address")
    lowered = raw.lstrip()[:5].lower()
    if protocol == "sip" or (
        protocol is None
        and (lowered.startswith("sip:") or lowered.startswith("sips:") or "<sip" in raw.lower())
    ):
        return _parse_sip(raw)
    return _parse_jid(raw)


# Addresses of events by their text, per event protocol: the same users talk all day, and an Address
# is immutable. Bounded: a flood of distinct addresses empties it, and long texts are not kept.
ADDRESS_CACHE_SIZE = 65536
ADDRESS_CACHE_TEXT = 256
_EVENT_ADDRESSES: dict[str, dict[str, Address]] = {"xmpp": {}, "sip": {}}


def event_address(raw: str, protocol: str) -> Address:
    """The address `raw` names in an event of `protocol` ("xmpp" | "sip"): a scheme in the text
    (sip:, sips:, xmpp:) wins over the protocol. Remembered; raises AddressError like parse_address."""
    cache = _EVENT_ADDRESSES[protocol]
    address = cache.get(raw)
    if address is None:
        address = parse_address(
            raw, None if raw[:5].lower().startswith(("sip:", "sips:", "xmpp:")) else protocol
        )
        if len(raw) <= ADDRESS_CACHE_TEXT:
            if len(cache) >= ADDRESS_CACHE_SIZE:
                cache.clear()
            cache[raw] = address
    return address


def normalise_list_entry(text: str) -> str:
    """A list entry that looks like an address or a domain is normalised like one; others stay."""
    entry = text.strip()
    try:
        if entry.lower().startswith(("sip:", "sips:")) or "@" in entry:
            return parse_address(entry).address
        if ("." in entry or any(dot in entry for dot in DOT_LIKES)) and " " not in entry:
            return normalise_domain(entry)
    except AddressError:
        return entry
    return entry
