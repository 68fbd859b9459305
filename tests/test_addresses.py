"""Address normalisation: JIDs (RFC 7622) and SIP URIs (RFC 3261) as rules see them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyplug.addresses import AddressError, normalise_domain, normalise_list_entry, parse_address


@pytest.mark.parametrize(
    ("raw", "address", "resource", "protocol"),
    [
        ("alice@acme.example", "alice@acme.example", "", "xmpp"),
        ("Alice@ACME.Example", "alice@acme.example", "", "xmpp"),
        ("alice@acme.example/Laptop", "alice@acme.example", "Laptop", "xmpp"),
        ("alice@acme.example/a/b@c", "alice@acme.example", "a/b@c", "xmpp"),
        ("alice@acme.example.", "alice@acme.example", "", "xmpp"),
        ("\uff41lice@acme.example", "alice@acme.example", "", "xmpp"),  # fullwidth a: PRECIS width mapping
        ("ÄLICE@acme.example", "älice@acme.example", "", "xmpp"),
        ("x@bücher.example", "x@bücher.example", "", "xmpp"),
        ("x@xn--bcher-kva.example", "x@bücher.example", "", "xmpp"),
        ("x@BÜCHER.example", "x@bücher.example", "", "xmpp"),
        ("acme.example", "acme.example", "", "xmpp"),
        ("conference.acme.example/room", "conference.acme.example", "room", "xmpp"),
        ("xmpp:alice@acme.example", "alice@acme.example", "", "xmpp"),
        ("user@[::1]", "user@[::1]", "", "xmpp"),
        ("user@127.0.0.1", "user@127.0.0.1", "", "xmpp"),
        ("sip:alice@acme.example", "alice@acme.example", "", "sip"),
        ("sip:%61lice@acme.example", "alice@acme.example", "", "sip"),
        ("SIP:Alice@ACME.example:5060;transport=tcp", "alice@acme.example", "", "sip"),
        ("sips:bob:secret@acme.example:5061", "bob@acme.example", "", "sip"),
        ('"Alice" <sip:alice@acme.example;transport=tcp>;tag=1', "alice@acme.example", "", "sip"),
        ("sip:alice@acme.example?subject=hi", "alice@acme.example", "", "sip"),
        (
            "sip:+493012345;phone-context=acme@gw.acme.example;user=phone",
            "+493012345@gw.acme.example",
            "",
            "sip",
        ),
        ("sip:acme.example", "acme.example", "", "sip"),
        ("sip:user@[2001:DB8::1]:5060", "user@[2001:db8::1]", "", "sip"),
    ],
)
def test_normalised_forms(raw: str, address: str, resource: str, protocol: str) -> None:
    parsed = parse_address(raw)
    assert parsed.address == address
    assert parsed.resource == resource
    assert parsed.protocol == protocol
    assert parsed.raw == raw
    user, _, domain = address.rpartition("@")
    assert parsed.user == user and parsed.domain == domain


@pytest.mark.parametrize(
    "left, right",
    [
        ("Alice@ACME.Example", "alice@acme.example"),
        ("sip:%61lice@acme.example", "sip:alice@acme.example"),
        ("sip:%41LICE@Acme.Example:5060", "sip:alice@acme.example"),
        ("x@bücher.example", "x@xn--bcher-kva.example"),
        ("alice@acme.example.", "alice@acme.example"),
    ],
)
def test_attacker_spellings_normalise_equal(left: str, right: str) -> None:
    assert parse_address(left).address == parse_address(right).address


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("@acme.example", "empty localpart"),
        ("alice@", "empty domain"),
        ("alice@acme.example/", "empty resource"),
        ("a b@acme.example", "forbidden character"),
        ('a"b@acme.example', "forbidden character"),
        ("x@-bad-.example", "bad domain"),
        ("x@[::1", "IPv6"),
        ("sip:", "no host"),
        ("sip:@acme.example", "empty user"),
        ("sip:alice@acme.example:port", "bad port"),
        ("sip:%ff%fe@acme.example", "bad escape"),
        ("a" * 1100 + "@acme.example", "longer than"),
        ("alice\x00@acme.example", "NUL"),
    ],
)
def test_malformed_addresses_raise_address_error(raw: str, fragment: str) -> None:
    with pytest.raises(AddressError, match=fragment):
        parse_address(raw)


def test_protocol_hint_parses_bare_address_as_sip() -> None:
    parsed = parse_address("Bob@ACME.example", "sip")
    assert parsed.protocol == "sip" and parsed.address == "bob@acme.example"


def test_list_entries_are_normalised_like_addresses() -> None:
    assert normalise_list_entry("Partner.Example") == "partner.example"
    assert normalise_list_entry("sip:Bob@X.Example:5060") == "bob@x.example"
    assert normalise_list_entry("Dave@Partner.Example") == "dave@partner.example"
    assert normalise_list_entry("no-external") == "no-external"  # a group name stays as written
    assert normalise_domain("xn--bcher-kva.example.") == "bücher.example"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_text_gives_an_address_or_address_error(raw: str) -> None:
    try:
        parsed = parse_address(raw)
    except AddressError:
        return
    again = parse_address(parsed.address, parsed.protocol)
    assert again.address == parsed.address  # normalisation is idempotent


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(
        r"(sips?:)?[A-Za-z0-9%]{1,8}@[A-Za-z0-9]{1,8}\.(example|EXAMPLE)(:[0-9]{1,5})?(;[a-z]+=[a-z]+)?",
        fullmatch=True,
    )
)
def test_sip_like_uris_are_idempotent(raw: str) -> None:
    try:
        parsed = parse_address(raw)
    except AddressError:
        return
    assert parse_address(parsed.address, parsed.protocol).address == parsed.address
    assert parsed.domain == parsed.domain.lower()


# -- issue 15: one normal form, no near misses ------------------------------------------------------

from policyplug import Event, load_policy  # noqa: E402
from policyplug.addresses import DOT_LIKES  # noqa: E402
from policyplug.events import EventError  # noqa: E402


@pytest.mark.parametrize(
    "raw",
    [
        "x@evil.example\u3002",
        "x@evil.example\uff0e",
        "x@evil.example\uff61",
        "sip:x@evil.example\u3002",
        "x@evil\u3002example",
        "x@EVIL\uff0eEXAMPLE",
        "x@evil.example.",
        "sip:x@evil\uff61example.",
        "xmpp:x@evil.example%E3%80%82",
        # UTS 46 also drops the soft hyphen and maps full-width and compatibility letters
        "x@ev\u00adil.example",
        "x@\uff45vil.example",
        "x@\U0001d41evil.example",
        "x@\u24d4vil\u3002example\uff0e",
        "x@evil.example\u3000",
    ],
)
def test_dot_likes_and_one_trailing_dot_give_the_domain_itself(raw: str) -> None:
    parsed = parse_address(raw)
    assert parsed.domain == "evil.example" and parsed.address == "x@evil.example"


@pytest.mark.parametrize(
    "raw",
    [
        "x@evil.example..",
        "x@evil.example\u3002\u3002",
        "x@evil.example.\uff0e",
        "x@.evil.example",
        "x@evil..example",
        "x@evil\u3002\u3002example",
        "sip:x@evil.example..",
        "sip:x@evil.example;x=y.",
        "x@.",
    ],
)
def test_empty_labels_are_invalid_not_near_misses(raw: str) -> None:
    try:
        parsed = parse_address(raw)
    except AddressError as exc:
        assert "empty" in str(exc) or "bad domain" in str(exc)
        return
    # a parameter ending in a dot is not part of the host: then the domain must be exact
    assert parsed.domain == "evil.example", raw


def test_dot_likes_are_every_separator_uts46_maps_to_a_dot() -> None:
    """DOT_LIKES (used to recognise list entries) is what idna's UTS 46 table maps to '.'."""
    import idna

    found = set()
    for cp in range(0x80, 0x30000):
        try:
            if "." in idna.uts46_remap(chr(cp), std3_rules=False, transitional=False):
                found.add(chr(cp))
        except idna.IDNAError:
            continue
    assert found == set(DOT_LIKES)
    assert normalise_list_entry("evil\u3002example") == "evil.example"


@pytest.mark.parametrize(
    "raw",
    [
        "sip:eve@evil.example;x=<sip:alice@acme.example>",
        "sip:eve@evil.example?h=<sip:alice@acme.example>",
        "sip:eve<sip:alice@acme.example>@evil.example",
        'sip:eve@evil.example;x="<sip:alice@acme.example>"',
        "sip:eve@evil.example <sip:alice@acme.example>",
        "<sip:alice@acme.example> <sip:eve@evil.example>",
        '"Alice" <sip:eve@evil.example> <sip:alice@acme.example>',
        '"Alice" <sip:eve@evil.example>x<sip:alice@acme.example>',
        "sip:alice@acme.example;maddr=evil.example",  # a proxy sends it to evil.example
        "sip:alice@acme.example;transport=tcp;MADDR=evil.example",
    ],
)
def test_sip_uris_never_yield_an_address_the_proxy_does_not_route_to(raw: str) -> None:
    with pytest.raises(AddressError):
        parse_address(raw)


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ('"<sip:alice@acme.example>" <sip:eve@evil.example>;tag=1', "eve@evil.example"),
        ("Alice Smith <sip:eve@evil.example>", "eve@evil.example"),
        ("sip:alice%40mail.example@evil.example", "alice@mail.example@evil.example"),
    ],
)
def test_sip_name_addrs_and_escaped_users(raw: str, address: str) -> None:
    parsed = parse_address(raw)
    assert parsed.address == address
    assert parse_address(parsed.address, "sip").address == address


@pytest.mark.parametrize(
    "raw",
    [
        "sip:a%00b@evil.example",
        "sip:a%0Ab@evil.example",
        "sip:a%1b[31m@evil.example",
        "sip:a%7f@evil.example",
        "sip:a%c2%85@evil.example",
        "sip:a%e2%80%8bb@evil.example",
        "sip:a%e2%80%aeb@evil.example",
        "sip:a%20b@evil.example",
        "sip:a%4@evil.example",
        "sip:a%zz@evil.example",
        "sip:a\x01b@evil.example",
        "sip:bob@evil%2eexample",
        "xmpp:a%00b@evil.example",
        # decoded, these would split the user when its normal form is read again
        "sip:a%3bx@evil.example",
        "sip:a%3Ax@evil.example",
        "sip:a%3fx@evil.example",
        "sip:a%25@evil.example",
    ],
)
def test_sip_users_with_nul_controls_or_bad_escapes_are_errors(raw: str) -> None:
    with pytest.raises(AddressError):
        parse_address(raw)


# Spellings of evil.example / bob@evil.example that a server, UTS 46 or RFC 3261 treats as the same.
def _letter(c: str) -> st.SearchStrategy[str]:
    options = [c, c.upper(), chr(ord(c) + 0xFEE0), chr(ord(c.upper()) + 0xFEE0)]
    if c.isalpha():
        options += [chr(0x1D41A + ord(c) - ord("a")), chr(0x24D0 + ord(c) - ord("a"))]  # math bold, circled
    return st.sampled_from(options)


@st.composite
def domain_spellings(draw: st.DrawFn, name: str = "evil.example") -> str:
    out = []
    for c in name:
        out.append(draw(st.sampled_from("." + DOT_LIKES)) if c == "." else draw(_letter(c)))
    if draw(st.booleans()):
        out.append(draw(st.sampled_from("." + DOT_LIKES)))  # one trailing dot: a fully qualified name
    return "".join(out)


@st.composite
def address_spellings(draw: st.DrawFn) -> str:
    domain = draw(domain_spellings())
    if draw(st.booleans()):  # XMPP: PRECIS maps case and width in the localpart
        user = "".join(
            draw(st.sampled_from([c, c.upper(), chr(ord(c) + 0xFEE0), chr(ord(c.upper()) + 0xFEE0)]))
            for c in "bob"
        )
        tail = draw(st.sampled_from(["", "/res", "/Desk 1"]))
        return draw(st.sampled_from(["", "xmpp:"])) + f"{user}@{domain}" + tail
    # SIP: case, escapes, password, port, parameters, headers, name-addr
    user = "".join(
        draw(st.sampled_from([c, c.upper(), f"%{ord(c):02x}", f"%{ord(c.upper()):02X}"])) for c in "bob"
    )
    user += draw(st.sampled_from(["", ":secret", ";phone-context=x"]))
    uri = draw(st.sampled_from(["sip:", "SIP:", "sips:"])) + f"{user}@{domain}"
    uri += draw(st.sampled_from(["", ":5060", ":5061"])) + draw(
        st.sampled_from(["", ";transport=tcp", ";lr"])
    )
    uri += draw(st.sampled_from(["", "?subject=hi", "?h=%3Csip:alice@acme.example%3E"]))
    return draw(st.sampled_from(["{}", "<{}>", '"Bob" <{}>;tag=1', "Bob <{}>"])).format(uri)


@settings(max_examples=300, deadline=None)
@given(address_spellings())
def test_normalisation_is_idempotent_over_spellings(raw: str) -> None:
    try:
        parsed = parse_address(raw)
    except AddressError:
        return
    assert parsed.address == "bob@evil.example", raw
    assert parse_address(parsed.address, parsed.protocol).address == parsed.address
    assert normalise_domain(parsed.domain) == parsed.domain


_PIECES = st.sampled_from(
    [
        "a",
        "B",
        "\uff41",
        "\u3002",
        "\uff0e",
        "\uff61",
        ".",
        "..",
        "%41",
        "%3b",
        "%25",
        "%00",
        "%e2%80%8b",
        "ß",
        "ü",
        "u\u0308",
        "xn--bcher-kva",
        "İ",
        "\u0130",
        ";x=1",
        "?h=1",
        ":5060",
        "@",
        "/",
        "<",
        ">",
        '"',
        " ",
        "\t",
        "sip:",
        "sips:",
        "xmpp:",
        "[::1]",
        "1.2.3.4",
        "-",
        "\U0001d41a",
        "\u24d0",
        "ﬁ",
        "\u200d",
        "\u202e",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=10).map("".join), st.sampled_from([None, "xmpp", "sip"]))
def test_normalisation_is_total_and_idempotent(raw: str, protocol: str | None) -> None:
    """Any text gives an Address or an AddressError (nothing else), and the normal form is a fixpoint."""
    try:
        parsed = parse_address(raw, protocol)
    except AddressError:
        return
    again = parse_address(parsed.address, parsed.protocol)
    assert again.address == parsed.address and again.domain == parsed.domain and again.user == parsed.user
    assert normalise_domain(parsed.domain) == parsed.domain


BLOCKING_POLICY = """policy "block"
local domains ["acme.example"]
list blocked = ["evil.example"]
list blocked_users = ["bob@evil.example"]
default allow
rule users:
  when recipient.address in blocked_users || sender.address in blocked_users
  deny "user"
rule domains:
  when recipient.domain in blocked
  deny "domain"
rule senders:
  when sender.domain in blocked
  deny "domain"
"""


@pytest.fixture(scope="module")
def blocking_policy() -> object:
    return load_policy(text=BLOCKING_POLICY)


def _decided_or_invalid(policy: object, data: dict[str, object]) -> str:
    try:
        event = Event.from_json(data)
    except EventError:
        return "invalid"
    return policy.decide(event).decision  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "to",
    [
        "x@evil.example\u3002",
        "x@evil.example\uff0e",
        "x@evil.example\uff61",
        "x@evil.example..",
        "sip:x@evil.example\u3002",
    ],
)
def test_issue15_repro_domain_rules_catch_dot_like_spellings(blocking_policy: object, to: str) -> None:
    protocol = "sip" if to.startswith("sip:") else "xmpp"
    sender = "sip:alice@acme.example" if protocol == "sip" else "alice@acme.example"
    assert _decided_or_invalid(blocking_policy, {"kind": "message", "from": sender, "to": to}) in (
        "deny",
        "invalid",
    )


@settings(max_examples=300, deadline=None)
@given(address_spellings(), st.booleans())
def test_no_spelling_of_a_listed_domain_or_address_escapes_the_rule(
    blocking_policy: object, raw: str, as_sender: bool
) -> None:
    local = "sip:alice@acme.example" if "sip" in raw.lower() else "alice@acme.example"
    data = {"kind": "message", "from": raw if as_sender else local, "to": local if as_sender else raw}
    assert _decided_or_invalid(blocking_policy, data) in ("deny", "invalid"), raw


@pytest.mark.parametrize("raw", ["a\n@acme.example", "a@acme.example/res\nx", "a\n@acme.example/res"])
def test_a_newline_before_the_end_of_a_part_is_no_plain_character(raw: str) -> None:
    """`$` in a Python regex also matches before a final newline: the ASCII fast path took `a\\n`
    for a plain localpart. Control characters are refused wherever they stand."""
    with pytest.raises(AddressError):
        parse_address(raw)
