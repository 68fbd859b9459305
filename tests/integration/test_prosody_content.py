"""What the policy sees is what the recipient gets (docs/semantics.md, "What body and subject are"):
mod_policyplug in a real Prosody shows the policy every text a client can show (every <body>,
XHTML-IM, out-of-band data, forwarded messages, subjects, ...), refuses or flags what it cannot
read, and a domain spelled with another full stop does not escape a rule naming it. Real slixmpp
clients send the stanzas as raw XML, the way an attacker's client would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.prosody_deployment import (
    Deployment,
    error_condition,
    login,
    next_message,
    nothing_arrives,
    running,
)

POLICY = Path(__file__).resolve().parent / "policies" / "prosody-content.policy"
CARD = "4111 1111 1111 1111"
XHTML = "xmlns='http://jabber.org/protocol/xhtml-im'"
XHTML_BODY = "xmlns='http://www.w3.org/1999/xhtml'"
FORWARD = "xmlns='urn:xmpp:forward:0'"
OMEMO = (
    "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'><key rid='2'>AAAA</key>"
    "<iv>BBBB</iv></header><payload>CCCC</payload></encrypted>"
)

# Each way to put a card number where a client shows it beside a harmless <body>.
SMUGGLED = {
    "second body in another language": f"<body>hello</body><body xml:lang='de'>card {CARD}</body>",
    "body in another language first": f"<body xml:lang='de'>Karte {CARD}</body><body>hello</body>",
    "XHTML-IM copy": f"<body>hello</body><html {XHTML}><body {XHTML_BODY}><p>card {CARD}</p></body></html>",
    "XHTML-IM split over spans": f"<body>hello</body><html {XHTML}><body {XHTML_BODY}><p>card <span>4111</span>"
    f"<em> 1111</em> <strong>1111 1111</strong></p></body></html>",
    "XHTML-IM image alt text": f"<body>hello</body><html {XHTML}><body {XHTML_BODY}><img src='https://x.example/"
    f"a.png' alt='{CARD}'/></body></html>",
    "XHTML-IM only, no body": f"<html {XHTML}><body {XHTML_BODY}><p>{CARD}</p></body></html>",
    "out-of-band URL": f"<body>see link</body><x xmlns='jabber:x:oob'><url>https://x.example/{CARD.replace(' ', '-')}"
    "</url></x>",
    "out-of-band description": f"<body>see link</body><x xmlns='jabber:x:oob'><url>https://x.example/a</url>"
    f"<desc>{CARD}</desc></x>",
    "forwarded message": f"<body>see below</body><forwarded {FORWARD}><message xmlns='jabber:client' "
    f"from='x@acme.example' to='y@acme.example'><body>{CARD}</body></message></forwarded>",
    "forwarded twice": f"<body>see below</body><forwarded {FORWARD}><message xmlns='jabber:client'><body>fw</body>"
    f"<forwarded {FORWARD}><message xmlns='jabber:client'><body>{CARD}</body></message>"
    "</forwarded></message></forwarded>",
    "carbon copy": f"<sent xmlns='urn:xmpp:carbons:2'><forwarded {FORWARD}><message xmlns='jabber:client' "
    f"to='z@acme.example'><body>{CARD}</body></message></forwarded></sent>",
    "forwarded XHTML-IM": f"<body>x</body><forwarded {FORWARD}><message xmlns='jabber:client'><html {XHTML}>"
    f"<body {XHTML_BODY}>{CARD}</body></html></message></forwarded>",
    "direct invitation reason": f"<x xmlns='jabber:x:conference' jid='room@rooms.acme.example' reason='{CARD}'/>",
    "mediated invitation reason": "<x xmlns='http://jabber.org/protocol/muc#user'><invite to='bob@acme.example'>"
    f"<reason>{CARD}</reason></invite></x>",
    "file description (XEP-0447)": "<body>a file</body><file-sharing xmlns='urn:xmpp:sfs:0'>"
    "<file xmlns='urn:xmpp:file:metadata:0'><name>x.txt</name>"
    f"<desc>{CARD}</desc></file></file-sharing>",
    "body with child elements": "<body>card 4111<b xmlns='urn:x:y'/> 1111 1111 1111</body>",
    "nickname (XEP-0172)": f"<body>hello</body><nick xmlns='http://jabber.org/protocol/nick'>{CARD}</nick>",
    "reaction (XEP-0444)": f"<reactions xmlns='urn:xmpp:reactions:0' id='m1'><reaction>{CARD}</reaction></reactions>",
    "data form value": "<body>a form</body><x xmlns='jabber:x:data' type='form'><title>t</title><field var='a'>"
    f"<value>{CARD}</value></field></x>",
    "data form label": f"<body>a form</body><x xmlns='jabber:x:data' type='form'><field var='a' label='{CARD}'/></x>",
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    yield from running(
        tmp_path_factory.mktemp("prosody-content"), transport="socket", timeout=10, policy=POLICY
    )


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """policyplug_unreadable_content = "decide", and archive copies without any text."""
    yield from running(
        tmp_path_factory.mktemp("prosody-content-decide"),
        transport="socket",
        timeout=10,
        policy=POLICY,
        extra_options={"policyplug_unreadable_content": "decide", "policyplug_copy_body": "summary"},
    )


def raw_message(to: str, inner: str, mtype: str = "chat", id_: str = "m") -> str:
    return f"<message xmlns='jabber:client' to='{to}' type='{mtype}' id='{id_}'>{inner}</message>"


async def refused(sender, receiver, inner: str, reason: str, to: str = "bob@acme.example") -> None:  # type: ignore[no-untyped-def]
    sender.send_raw(raw_message(to, inner))
    bounce = await next_message(sender)
    assert bounce["type"] == "error", (inner, bounce)
    assert error_condition(bounce) == ("policy-violation", reason), inner
    assert await nothing_arrives(receiver, 0.5), inner


def test_every_text_a_client_shows_is_checked(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, bob = await login(deployment, "alice@acme.example", "bob@acme.example")
        # controls: harmless texts in every form are delivered
        alice.send_raw(
            raw_message(
                "bob@acme.example",
                "<body>hello</body><body xml:lang='de'>hallo</body>"
                f"<html {XHTML}><body {XHTML_BODY}><p>hello</p></body></html>",
            )
        )
        received = await next_message(bob)
        assert received["body"] == "hello"
        alice.send_raw(raw_message("bob@acme.example", f"<body>card {CARD}</body>"))
        assert error_condition(await next_message(alice)) == ("policy-violation", "no card numbers")
        for name, inner in SMUGGLED.items():
            try:
                await refused(alice, bob, inner, "no card numbers")
            except AssertionError as exc:
                raise AssertionError(f"smuggled past the policy: {name}") from exc
        # an error message's text is shown too; an error is never answered, so nothing comes back
        alice.send_raw(
            raw_message(
                "bob@acme.example",
                "<error type='cancel'><undefined-condition "
                "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:"
                f"ns:xmpp-stanzas'>{CARD}</text></error>",
                mtype="error",
            )
        )
        assert await nothing_arrives(bob, 1.0)
        # every subject, in every language
        await refused(alice, bob, "<subject>top secret</subject><body>hi</body>", "no secrets in subjects")
        await refused(
            alice,
            bob,
            "<subject>hi</subject><subject xml:lang='de'>secret</subject><body>hi</body>",
            "no secrets in subjects",
        )
        await refused(
            alice,
            bob,
            f"<body>x</body><forwarded {FORWARD}><message xmlns='jabber:client'>"
            "<subject>secret</subject></message></forwarded>",
            "no secrets in subjects",
        )
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())


def test_unreadable_content_is_refused_by_default(deployment: Deployment) -> None:
    too_deep = (
        "<body>x</body>"
        + f"<forwarded {FORWARD}><message xmlns='jabber:client'><body>x</body>" * 10
        + "</message></forwarded>" * 10
    )

    async def scenario() -> None:
        alice, bob = await login(deployment, "alice@acme.example", "bob@acme.example")
        await refused(
            alice,
            bob,
            OMEMO + "<body>I sent you an OMEMO encrypted message</body>",
            "content the policy cannot read: OMEMO content",
        )
        await refused(
            alice,
            bob,
            "<x xmlns='jabber:x:encrypted'>hQEMA</x><body>encrypted</body>",
            "content the policy cannot read: OpenPGP (XEP-0027) content",
        )
        await refused(
            alice,
            bob,
            "<body>?OTR:AAMGAAAAAQAAAAEAAADAVf3Ei72ZgFeKqWvLMnuVPVCwxktsOZ1QdjeLp6jn62mCVtlY9nS6sRkecpjuLYHRxyTdRu2iEVtSsjZqK55ovZ35SfkOPHeFYa9BgNkNW4ZhJeNoTd2cOj3xJvOhUL3.</body>",
            "content the policy cannot read: OTR-encrypted body",
        )
        await refused(alice, bob, too_deep, "content the policy cannot read: nested deeper than 8")
        # readable, then: delivered
        alice.send_message(mto="bob@acme.example", mbody="plain again", mtype="chat")
        assert (await next_message(bob))["body"] == "plain again"
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())
    assert deployment.acme.log_text().count("content the policy cannot read (OMEMO content)") == 1


def test_unreadable_content_decided_when_the_operator_says_so(lenient: Deployment) -> None:
    async def scenario() -> None:
        alice, bob = await login(lenient, "alice@acme.example", "bob@acme.example")
        alice.send_raw(
            raw_message("bob@acme.example", OMEMO + "<body>I sent you an OMEMO encrypted message</body>")
        )
        received = await next_message(bob)
        assert received.xml.find("{eu.siacs.conversations.axolotl}encrypted") is not None
        # what was read is still decided: a card number beside the encrypted part is refused
        await refused(alice, bob, OMEMO + f"<body xml:lang='de'>{CARD}</body>", "no card numbers")
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("dot", ["\u3002", "\uff0e", "\uff61"])
def test_domain_spelled_with_another_full_stop_is_blocked(deployment: Deployment, dot: str) -> None:
    """issue 15.2: `partner.example` + an ideographic / full-width / half-width full stop is the same
    domain to Prosody (it routes the message there over s2s), so a rule naming the domain applies."""

    async def scenario() -> None:
        alice, dave = await login(deployment, "alice@acme.example", "dave@partner.example")
        for to in (f"dave@partner.example{dot}", f"dave@partner{dot}example"):
            alice.send_message(mto=to, mbody="hello", mtype="chat")
            bounce = await next_message(alice, 20)
            assert bounce["type"] == "error", (to, bounce)
            assert error_condition(bounce) == ("policy-violation", "partner.example is blocked"), to
        assert await nothing_arrives(dave, 3.0)
        for client in (alice, dave):
            client.disconnect()

    asyncio.run(scenario())


def test_archive_copy_shows_the_text_and_disclaimers_reach_every_body(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, bob, carol, archive = await login(
            deployment, "alice@acme.example", "bob@acme.example", "carol@acme.example", "archive@acme.example"
        )
        alice.send_raw(
            raw_message(
                "bob@acme.example",
                "<subject>Q3</subject><body>for the record: 42</body>"
                "<body xml:lang='de'>fuer das Protokoll: 42</body>",
            )
        )
        assert (await next_message(bob))["body"] == "for the record: 42"
        copy = await next_message(archive)
        text = copy["body"]
        assert text.startswith("Copy of a message from alice@acme.example/"), text
        assert "Subject: Q3" in text and "for the record: 42\nfuer das Protokoll: 42" in text, text
        forwarded = copy.xml.find("{urn:xmpp:forward:0}forwarded")
        original = forwarded.find("{jabber:client}message")
        assert [b.text for b in original.findall("{jabber:client}body")] == [
            "for the record: 42",
            "fuer das Protokoll: 42",
        ]

        # a disclaimer goes on every body and on the XHTML-IM copy: what any client shows has it
        alice.send_raw(
            raw_message(
                "carol@acme.example",
                "<body>hi carol</body><body xml:lang='de'>hallo</body>"
                f"<html {XHTML}><body {XHTML_BODY}><p>hi <em>carol</em></p></body></html>",
            )
        )
        received = await next_message(carol)
        bodies = [b.text for b in received.xml.findall("{jabber:client}body")]
        assert bodies == ["hi carol\n\nMonitored by ACME.", "hallo\n\nMonitored by ACME."], bodies
        xhtml = received.xml.find("{http://jabber.org/protocol/xhtml-im}html")
        assert "Monitored by ACME." in "".join(xhtml.itertext())
        for client in (alice, bob, carol, archive):
            client.disconnect()

    asyncio.run(scenario())


def test_archive_copy_without_text_when_configured(lenient: Deployment) -> None:
    async def scenario() -> None:
        alice, bob, archive = await login(
            lenient, "alice@acme.example", "bob@acme.example", "archive@acme.example"
        )
        alice.send_message(mto="bob@acme.example", mbody="for the record: 43", mtype="chat")
        assert (await next_message(bob))["body"] == "for the record: 43"
        copy = await next_message(archive)
        assert copy["body"].startswith("Copy of a message from alice@acme.example/")
        assert "43" not in str(copy.xml.find("{jabber:client}body").text)
        original = copy.xml.find("{urn:xmpp:forward:0}forwarded").find("{jabber:client}message")
        assert original.get("to") == "bob@acme.example" and len(original) == 0  # who and whom, no text
        for client in (alice, bob, archive):
            client.disconnect()

    asyncio.run(scenario())
