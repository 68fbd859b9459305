"""Address normalisation: JIDs (RFC 7622) and SIP URIs (RFC 3261) as rules see them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyplug.addresses import AddressError, normalise_domain, normalise_list_entry, parse_address


@pytest.mark.parametrize(("raw", "address", "resource", "protocol"), [
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
    ("sip:+493012345;phone-context=acme@gw.acme.example;user=phone", "+493012345@gw.acme.example", "", "sip"),
    ("sip:acme.example", "acme.example", "", "sip"),
    ("sip:user@[2001:DB8::1]:5060", "user@[2001:db8::1]", "", "sip"),
])
def test_normalised_forms(raw: str, address: str, resource: str, protocol: str) -> None:
    parsed = parse_address(raw)
    assert parsed.address == address
    assert parsed.resource == resource
    assert parsed.protocol == protocol
    assert parsed.raw == raw
    user, _, domain = address.rpartition("@")
    assert parsed.user == user and parsed.domain == domain


@pytest.mark.parametrize("left, right", [
    ("Alice@ACME.Example", "alice@acme.example"),
    ("sip:%61lice@acme.example", "sip:alice@acme.example"),
    ("sip:%41LICE@Acme.Example:5060", "sip:alice@acme.example"),
    ("x@bücher.example", "x@xn--bcher-kva.example"),
    ("alice@acme.example.", "alice@acme.example"),
])
def test_attacker_spellings_normalise_equal(left: str, right: str) -> None:
    assert parse_address(left).address == parse_address(right).address


@pytest.mark.parametrize("raw, fragment", [
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
])
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
@given(st.from_regex(r"(sips?:)?[A-Za-z0-9%]{1,8}@[A-Za-z0-9]{1,8}\.(example|EXAMPLE)(:[0-9]{1,5})?(;[a-z]+=[a-z]+)?",
                     fullmatch=True))
def test_sip_like_uris_are_idempotent(raw: str) -> None:
    try:
        parsed = parse_address(raw)
    except AddressError:
        return
    assert parse_address(parsed.address, parsed.protocol).address == parsed.address
    assert parsed.domain == parsed.domain.lower()
