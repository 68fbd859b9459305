"""mod_policyplug inside a real Prosody, deciding through `policyplug serve` as a component, driven by
real slixmpp clients: every effect of the rule language, fail-closed and fail-open."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slixmpp.xmlstream import ET

from tests.servers.prosody import ProsodyServer
from tests.xmpp_client import TestClient

ROOT = Path(__file__).resolve().parent.parent.parent
ADAPTER = ROOT / "adapters" / "prosody"
POLICY = Path(__file__).resolve().parent / "policies" / "prosody-adapter.policy"
USERS = [("alice", "acme.example"), ("bob", "acme.example"), ("new", "acme.example"), ("old", "acme.example"),
         ("archive", "acme.example"), ("dave", "partner.example"), ("banned", "acme.example")]


class Deployment:
    def __init__(self, workdir: Path, fail_mode: str = "closed"):
        self.server = ProsodyServer(
            workdir / "prosody", hosts=["acme.example", "partner.example"],
            components={"policy.acme.example": "s3cret"}, plugin_paths=[str(ADAPTER)],
            host_options={host: {"modules_enabled": ["policyplug"], "policyplug_component": "policy.acme.example",
                                 "policyplug_timeout": 1, "policyplug_fail_mode": fail_mode}
                          for host in ("acme.example", "partner.example")})
        self.workdir = workdir
        self.service: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.server.start()
        for user, host in USERS:
            self.server.register(user, host, "pw")
        self.start_service()

    def start_service(self) -> None:
        before = self.server.component_logins()
        self.service = subprocess.Popen(
            [sys.executable, "-m", "policyplug", "serve", str(POLICY), "--component", "policy.acme.example",
             "--secret", "s3cret", "--server", f"127.0.0.1:{self.server.component_port}",
             "--socket", str(self.workdir / "svc.sock")], stdout=open(self.workdir / "svc.log", "a"), stderr=subprocess.STDOUT)
        self.server.wait_for_component(before)

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.service.kill()
            self.service = None

    def stop(self) -> None:
        self.stop_service()
        self.server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("prosody-adapter"))
    d.start()
    yield d
    d.stop()


async def clients(port: int, *names: str) -> dict[str, TestClient]:
    logged_in = {}
    for name in names:
        client = TestClient(name, "pw")
        await client.login(port)
        logged_in[name] = client
    return logged_in


async def next_message(client: TestClient, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(client.messages.get(), timeout)


STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def error_condition(stanza) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(condition, text) read from the XML: slixmpp does not know every RFC 6120 condition by name."""
    error = stanza.xml.find("{jabber:client}error")
    assert error is not None, stanza
    condition = next(c.tag.split("}")[1] for c in error if c.tag.startswith("{" + STANZAS) and not c.tag.endswith("text"))
    text = error.find(f"{{{STANZAS}}}text")
    return condition, text.text if text is not None else ""


async def nothing_arrives(client: TestClient, wait: float = 1.5) -> bool:
    try:
        message = await asyncio.wait_for(client.messages.get(), wait)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message: {message}")


def test_effects_are_enforced(deployment: Deployment) -> None:
    port = deployment.server.c2s_port

    async def scenario() -> None:
        c = await clients(port, "alice@acme.example", "bob@acme.example", "new@acme.example",
                          "archive@acme.example", "dave@partner.example")
        alice, bob, new, archive, dave = (c[n] for n in ("alice@acme.example", "bob@acme.example",
                                                         "new@acme.example", "archive@acme.example",
                                                         "dave@partner.example"))
        # internal chat is delivered untouched
        alice.send_message(mto="bob@acme.example", mbody="hello bob", mtype="chat")
        received = await next_message(bob)
        assert received["body"] == "hello bob" and received["from"].bare == "alice@acme.example"

        # a denied message bounces to its sender with policy-violation and the reason
        alice.send_message(mto="bob@acme.example", mbody="this is forbidden", mtype="chat")
        bounce = await next_message(alice)
        assert bounce["type"] == "error"
        assert error_condition(bounce) == ("policy-violation", "no forbidden words")
        assert await nothing_arrives(bob, 1.0)

        # a dropped one never arrives, and nothing comes back
        alice.send_message(mto="bob@acme.example", mbody="please drop me", mtype="chat")
        assert await nothing_arrives(bob, 1.0)
        assert await nothing_arrives(alice, 0.5)

        # a redirected one arrives at the new address
        alice.send_message(mto="old@acme.example", mbody="for whoever has the old address", mtype="chat")
        redirected = await next_message(new)
        assert redirected["body"] == "for whoever has the old address"

        # external chat: delivered with the disclaimer, and a forwarded copy reaches the archive
        alice.send_message(mto="dave@partner.example", mbody="offer attached", mtype="chat")
        external = await next_message(dave)
        assert external["body"] == "offer attached\n\nExternal message, archived by ACME."
        copy = await next_message(archive)
        forwarded = copy.xml.find("{urn:xmpp:forward:0}forwarded")
        assert forwarded is not None
        original = next((child for child in forwarded if child.tag.endswith("}message")), None)
        assert original is not None, ET.tostring(forwarded)
        assert original.get("to") == "dave@partner.example"
        body = next(child for child in original if child.tag.endswith("}body"))
        assert body.text.startswith("offer attached")

        # a refused subscription: the requester gets the matching refusal
        refusals: asyncio.Queue = asyncio.Queue()
        alice.add_event_handler("presence_unsubscribed", refusals.put_nowait)
        alice.send_presence(pto="dave@partner.example", ptype="subscribe")
        refusal = await asyncio.wait_for(refusals.get(), 5)
        assert refusal["from"].bare == "dave@partner.example" and refusal["status"] == "no subscriptions with partners"

        # a stanza without 'to' and a malformed body pass through without an error
        alice.send_presence()
        alice.send_message(mto="bob@acme.example", mbody="x" * 60_000, mtype="chat")
        big = await next_message(bob)
        assert len(big["body"]) == 60_000
        for client in c.values():
            client.disconnect()

    asyncio.run(scenario())
    log = deployment.server.log_text()
    assert "error\t" not in log.replace("policy-violation", ""), [
        line for line in log.splitlines() if "\terror\t" in line][:5]


def test_login_refused_by_policy(deployment: Deployment) -> None:
    async def scenario() -> None:
        client = TestClient("banned@acme.example", "pw")
        closed = asyncio.Event()
        client.add_event_handler("disconnected", lambda _: closed.set())
        client.connect("127.0.0.1", deployment.server.c2s_port)
        await asyncio.wait_for(closed.wait(), 15)

    asyncio.run(scenario())
    assert "this account is suspended" in deployment.server.log_text()


def test_fail_closed_when_the_service_is_gone(deployment: Deployment) -> None:
    async def scenario() -> None:
        c = await clients(deployment.server.c2s_port, "alice@acme.example", "bob@acme.example")
        alice, bob = c["alice@acme.example"], c["bob@acme.example"]
        deployment.stop_service()  # logged in; now the decision service goes away
        alice.send_message(mto="bob@acme.example", mbody="anyone there?", mtype="chat")
        bounce = await next_message(alice, 10)
        assert bounce["type"] == "error"
        assert error_condition(bounce) == ("policy-violation", "policy service unavailable")
        assert await nothing_arrives(bob, 1.0)
        # and a new login is refused too: fail closed means closed
        closed = asyncio.Event()
        late = TestClient("new@acme.example", "pw")
        late.add_event_handler("disconnected", lambda _: closed.set())
        late.connect("127.0.0.1", deployment.server.c2s_port)
        await asyncio.wait_for(closed.wait(), 15)
        for client in c.values():
            client.disconnect()

    try:
        asyncio.run(scenario())
    finally:
        deployment.start_service()
    assert "fail closed, refusing" in deployment.server.log_text()


def test_fail_open_delivers_when_the_service_is_gone(tmp_path: Path) -> None:
    d = Deployment(tmp_path, fail_mode="open")
    d.start()
    try:
        d.stop_service()

        async def scenario() -> None:
            c = await clients(d.server.c2s_port, "alice@acme.example", "bob@acme.example")
            c["alice@acme.example"].send_message(mto="bob@acme.example", mbody="fail open", mtype="chat")
            received = await next_message(c["bob@acme.example"], 10)
            assert received["body"] == "fail open"
            assert "fail open, delivering" in d.server.log_text()
            for client in c.values():
                client.disconnect()

        asyncio.run(scenario())
    finally:
        d.stop()
