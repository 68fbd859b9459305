"""mod_policyplug inside a real Prosody, deciding through `policyplug serve` over its Unix socket and
as an XEP-0114 component (every test runs with both), driven by real slixmpp clients; the outside
world is a second real Prosody reached over s2s. Every effect of the rule language is shown here;
fail modes are in test_prosody_failure.py, bad input in test_prosody_bad_input.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.integration.prosody_deployment import (
    Deployment,
    element,
    error_condition,
    login,
    next_message,
    nothing_arrives,
    running,
)


@pytest.fixture(scope="module", params=["socket", "component"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    # a generous timeout: these tests are about effects; fail modes and timeouts have their own
    yield from running(
        tmp_path_factory.mktemp(f"prosody-{request.param}"), transport=request.param, timeout=10
    )


def is_groupchat_noise(msg) -> bool:  # type: ignore[no-untyped-def]
    return msg["type"] == "groupchat" and not msg["body"]


def test_internal_chat_deny_drop_redirect(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, bob, new = await login(
            deployment, "alice@acme.example", "bob@acme.example", "new@acme.example"
        )
        # internal chat is delivered untouched
        alice.send_message(mto="bob@acme.example", mbody="hello bob", mtype="chat")
        received = await next_message(bob)
        assert received["body"] == "hello bob" and received["from"].bare == "alice@acme.example"

        # a denied message bounces to its sender with policy-violation and the reason, and goes nowhere
        alice.send_message(mto="bob@acme.example", mbody="this is forbidden", mtype="chat")
        bounce = await next_message(alice)
        assert bounce["type"] == "error" and bounce["from"].bare == "bob@acme.example"
        assert error_condition(bounce) == ("policy-violation", "no forbidden words")
        assert await nothing_arrives(bob, 1.0)

        # a dropped one never arrives, and nothing comes back
        alice.send_message(mto="bob@acme.example", mbody="please drop me", mtype="chat")
        alice.send_message(mto="bob@acme.example", mbody="after the dropped one", mtype="chat")
        assert (await next_message(bob))[
            "body"
        ] == "after the dropped one"  # in order: the drop was decided first
        assert await nothing_arrives(alice, 0.5)

        # a redirected one arrives at the new address
        alice.send_message(mto="old@acme.example", mbody="for whoever has the old address", mtype="chat")
        redirected = await next_message(new)
        assert redirected["body"] == "for whoever has the old address"
        assert redirected["from"].bare == "alice@acme.example"
        for client in (alice, bob, new):
            client.disconnect()

    asyncio.run(scenario())


def test_outbound_over_s2s_copy_and_disclaimer(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, archive, dave = await login(
            deployment, "alice@acme.example", "archive@acme.example", "dave@partner.example"
        )
        # external chat reaches the other server with the disclaimer; a copy reaches the archive
        alice.send_message(mto="dave@partner.example", mbody="offer attached", mtype="chat")
        external = await next_message(dave, 20)
        assert external["body"] == "offer attached\n\nExternal message, archived by ACME."
        assert external["from"].bare == "alice@acme.example"
        copy = await next_message(archive)
        forwarded = copy.xml.find("{urn:xmpp:forward:0}forwarded")
        assert forwarded is not None  # XEP-0297, with the original message inside
        assert forwarded.find("{urn:xmpp:delay}delay") is not None
        original = next(child for child in forwarded if child.tag.endswith("}message"))
        assert original.get("to") == "dave@partner.example"
        assert original.get("from").startswith("alice@acme.example/")
        body = next(child for child in original if child.tag.endswith("}body"))
        assert body.text.startswith("offer attached")

        # a refused subscription: the requester gets the matching refusal, the partner nothing
        alice.send_presence(pto="dave@partner.example", ptype="subscribe")
        refusal = await next_presence(alice, "unsubscribed")
        assert refusal["from"].bare == "dave@partner.example"
        assert refusal["status"] == "no subscriptions with partners"
        assert await no_presence(dave, "subscribe")
        for client in (alice, archive, dave):
            client.disconnect()

    asyncio.run(scenario())


def test_inbound_from_the_other_server(deployment: Deployment) -> None:
    async def scenario() -> None:
        dave, bob, archive = await login(
            deployment, "dave@partner.example", "bob@acme.example", "archive@acme.example"
        )
        # from outside: decided on arrival at acme.example, delivered with the disclaimer, archived
        dave.send_message(mto="bob@acme.example", mbody="hello from outside", mtype="chat")
        received = await next_message(bob, 20)
        assert received["body"] == "hello from outside\n\nExternal message, archived by ACME."
        assert received["from"].bare == "dave@partner.example"
        copy = await next_message(archive)
        assert copy.xml.find("{urn:xmpp:forward:0}forwarded") is not None

        # a denied one bounces back over s2s to the remote sender
        dave.send_message(mto="bob@acme.example", mbody="something forbidden", mtype="chat")
        bounce = await next_message(dave, 20)
        assert bounce["type"] == "error"
        assert error_condition(bounce) == ("policy-violation", "no forbidden words")
        assert await nothing_arrives(bob, 1.0)

        # an inbound subscription request is refused with the matching refusal, bob never sees it
        dave.send_presence(pto="bob@acme.example", ptype="subscribe")
        refusal = await next_presence(dave, "unsubscribed", 20)
        assert refusal["from"].bare == "bob@acme.example"
        assert await no_presence(bob, "subscribe")
        for client in (dave, bob, archive):
            client.disconnect()

    asyncio.run(scenario())


def test_rooms_joins_and_groupchat(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, bob = await login(deployment, "alice@acme.example", "bob@acme.example")
        for client, nick in ((alice, "alice"), (bob, "bob")):
            await join(client, f"lobby@rooms.acme.example/{nick}")
        alice.send_message(mto="lobby@rooms.acme.example", mbody="hello room", mtype="groupchat")
        received = await next_message(bob, skip=lambda m: is_groupchat_noise(m) or m["body"] != "hello room")
        assert received["from"] == "lobby@rooms.acme.example/alice"

        # a forbidden group chat message is bounced and reaches no occupant
        alice.send_message(mto="lobby@rooms.acme.example", mbody="forbidden words here", mtype="groupchat")
        bounce = await next_message(alice, skip=lambda m: m["type"] != "error")
        assert error_condition(bounce) == ("policy-violation", "no forbidden words")
        assert await nothing_arrives(bob, 1.0, skip=is_groupchat_noise)

        # a join the policy refuses: a presence error, and the room is never entered
        refused = await send_join(bob, "secret@rooms.acme.example/bob")
        assert refused["type"] == "error"
        assert error_condition(refused) == ("policy-violation", "this room is closed")
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())


def test_calls_and_file_transfer_iqs(deployment: Deployment) -> None:
    async def scenario() -> None:
        alice, carol = await login(deployment, "alice@acme.example", "carol@acme.example")
        # a Jingle RTP session-initiate is a `call`: refused by rule, carol never sees it
        answer = await ask(
            alice,
            f"<iq type='set' id='call1' to='{carol.boundjid}'>"
            "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='s1' "
            f"initiator='{alice.boundjid}'><content creator='initiator' name='voice'>"
            "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></content></jingle></iq>",
        )
        assert answer["type"] == "error"
        assert error_condition(answer) == ("policy-violation", "carol takes no calls")

        # an HTTP upload slot request is a `file`
        answer = await ask(
            alice,
            "<iq type='get' id='up1' to='upload.acme.example'><request "
            "xmlns='urn:xmpp:http:upload:0' filename='plan.pdf' size='1000'/></iq>",
        )
        assert error_condition(answer) == ("policy-violation", "no file transfer")

        # an ordinary IQ is allowed: carol's client answers a disco#info query
        answer = await ask(
            alice,
            f"<iq type='get' id='disco1' to='{carol.boundjid}'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        )
        assert answer["type"] == "result"
        for client in (alice, carol):
            client.disconnect()

    asyncio.run(scenario())


def test_login_refused_by_policy(deployment: Deployment) -> None:
    async def scenario() -> None:
        from tests.xmpp_client import TestClient

        client = TestClient("banned@acme.example", "pw")
        closed = asyncio.Event()
        client.add_event_handler("disconnected", lambda _: closed.set())
        client.connect("127.0.0.1", deployment.acme.c2s_port)
        await asyncio.wait_for(closed.wait(), 15)
        assert not client.ready.is_set()  # no session ever started

    asyncio.run(scenario())
    assert "login of banned@acme.example/" in deployment.acme.log_text()
    assert "refused by policy: this account is suspended" in deployment.acme.log_text()


def test_every_stanza_settles_in_order(deployment: Deployment) -> None:
    """Many stanzas in flight at once: each one is decided exactly once and delivered (or bounced)
    in the order it was sent; no decision is lost (a synchronous module loses about one in 1,000)."""
    count = 1500

    async def scenario() -> None:
        alice, bob = await login(deployment, "alice@acme.example", "bob@acme.example")
        for i in range(count):
            body = f"{i} forbidden" if i % 10 == 0 else f"{i} fine"
            alice.send_message(mto="bob@acme.example", mbody=body, mtype="chat")
        delivered = [
            int((await next_message(bob, 60))["body"].split()[0]) for _ in range(count - count // 10)
        ]
        assert delivered == [i for i in range(count) if i % 10]
        bounced = [await next_message(alice, 60) for _ in range(count // 10)]
        assert all(error_condition(b) == ("policy-violation", "no forbidden words") for b in bounced)
        assert await nothing_arrives(bob, 1.0) and await nothing_arrives(alice, 0.5)
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())
    log = deployment.acme.log_text()
    assert "no decision for" not in log and "fail closed" not in log


# -- helpers ------------------------------------------------------------------------------------


async def ask(client, xml: str, timeout: float = 10):  # type: ignore[no-untyped-def]
    """Send a raw IQ; -> its answer (result or error)."""
    iq_id = element(xml).get("id")
    client.send_raw(xml)

    async def wait():  # type: ignore[no-untyped-def]
        while True:
            answer = await client.iq_answers.get()
            if answer["id"] == iq_id:
                return answer

    return await asyncio.wait_for(wait(), timeout)


async def next_presence(client, ptype: str, timeout: float = 10):  # type: ignore[no-untyped-def]
    async def wait():  # type: ignore[no-untyped-def]
        while True:
            presence = await client.presences.get()
            if presence["type"] == ptype:
                return presence

    return await asyncio.wait_for(wait(), timeout)


async def no_presence(client, ptype: str, wait: float = 1.5) -> bool:  # type: ignore[no-untyped-def]
    try:
        presence = await next_presence(client, ptype, wait)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected presence: {presence}")


async def send_join(client, room_jid: str, timeout: float = 10):  # type: ignore[no-untyped-def]
    """Send a MUC join presence; -> the room's answer (our own presence in the room, or an error)."""
    presence = client.make_presence(pto=room_jid)
    presence.append(element("<x xmlns='http://jabber.org/protocol/muc'/>"))
    presence.send()

    async def wait():  # type: ignore[no-untyped-def]
        while True:
            answer = await client.presences.get()
            if answer["from"] == room_jid:
                return answer

    return await asyncio.wait_for(wait(), timeout)


async def join(client, room_jid: str) -> None:  # type: ignore[no-untyped-def]
    answer = await send_join(client, room_jid)
    assert answer["type"] != "error", answer
