"""Bad input through mod_policyplug: a raw XMPP client (a plain socket on loopback, no TLS, no
client library to tidy anything up) sends stanzas with no `to`, malformed JIDs, a huge body,
characters JSON must escape, unusual and deeply nested children, odd types. Each one passes
through the adapter (decided, or refused by Prosody itself before it) without an error in either
server's log, and the session stays usable."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.prosody_deployment import Deployment, login, next_message, running

STREAM = (
    "<?xml version='1.0'?><stream:stream to='acme.example' xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)


class RawClient:
    """Just enough XMPP over a plain socket: stream, SASL PLAIN, resource binding."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = ""

    def send(self, xml: str) -> None:
        self.sock.sendall(xml.encode())

    def read_until(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.received, re.S)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not received; got: {self.received[-2000:]}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"closed by the server; got: {self.received[-2000:]}")
            self.received += chunk.decode(errors="replace")
        text, self.received = self.received[: match.end()], self.received[match.end() :]
        return text

    def login(self, user: str, password: str) -> str:
        self.send(STREAM)
        self.read_until("</stream:features>")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        self.read_until("<success")
        self.send(STREAM)
        self.read_until("</stream:features>")
        self.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        return self.read_until("<jid>[^<]+</jid>").rsplit("<jid>", 1)[1].split("</jid>")[0]

    def close(self) -> None:
        try:
            self.send("</stream:stream>")
        finally:
            self.sock.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    yield from running(tmp_path_factory.mktemp("prosody-bad-input"), clean_logs=False, transport="socket")


HUGE = 200_000  # under Prosody's default stanza size limit (256 KiB)
ESCAPES = 'quote " backslash \\ tab \t newline \n amp &amp; lt &lt; unicode é 漢字 😀 end'
NESTED = "<a xmlns='urn:example:deep'>" + "<b>" * 60 + "deep" + "</b>" * 60 + "</a>"
BAD_STANZAS = [
    # no 'to': addressed to the sender's own account
    "<message id='no-to-1' type='chat'><body>no to at all</body></message>",
    "<presence id='no-to-2'><status>here</status></presence>",
    "<iq type='get' id='no-to-3'><query xmlns='jabber:iq:roster'/></iq>",
    # malformed JIDs: Prosody answers jid-malformed before any module sees them
    "<message id='bad-jid-1' to='a@b@c'><body>x</body></message>",
    "<message id='bad-jid-2' to='@acme.example'><body>x</body></message>",
    "<message id='bad-jid-3' to='bob@acme.example/'><body>x</body></message>",
    "<message id='bad-jid-4' to='bob@'><body>x</body></message>",
    "<iq id='bad-jid-5' type='get' to='bob@acme..example'><ping xmlns='urn:xmpp:ping'/></iq>",
    # unusual but valid addresses
    "<message id='odd-jid-1' to='Bücher@ACME.example' type='chat'><body>unicode node</body></message>",
    "<message id='odd-jid-2' to='acme.example'><body>to the server</body></message>",
    # odd types, no children, unknown children, deep nesting, several bodies
    "<message id='odd-1' to='bob@acme.example' type='weird'><body>odd type</body></message>",
    "<message id='odd-2' to='bob@acme.example'/>",
    "<message id='odd-3' to='bob@acme.example' type='chat'><foo xmlns='urn:example:unknown'><bar/></foo>"
    "<x xmlns='jabber:x:oob'><url>http://example.com/a</url></x></message>",
    f"<message id='odd-4' to='bob@acme.example' type='chat'>{NESTED}<body>after deep</body></message>",
    "<message id='odd-5' to='bob@acme.example' type='chat'><body xml:lang='de'>Hallo</body>"
    "<body>hello</body><subject>a subject</subject><thread>t1</thread></message>",
    "<iq id='odd-6' type='get' to='bob@acme.example'/>",
    "<iq id='odd-7' type='result' to='bob@acme.example'/>",
    "<presence id='odd-8' type='probe' to='bob@acme.example'/>",
    "<presence id='odd-9' type='bogus' to='bob@acme.example'/>",
    "<presence id='odd-10' to='bob@acme.example'><x xmlns='urn:example:x'/><x xmlns='urn:example:x'/></presence>",
    # characters the event JSON must escape, and a huge body
    f"<message id='escapes' to='bob@acme.example' type='chat'><body>{ESCAPES}</body></message>",
    f"<message id='huge' to='bob@acme.example' type='chat'><body>{'x' * HUGE}</body></message>",
]


def test_bad_input_passes_without_errors(deployment: Deployment) -> None:
    async def scenario() -> None:
        (bob,) = await login(deployment, "bob@acme.example")
        raw = RawClient(deployment.acme.c2s_port)
        try:
            jid = await asyncio.to_thread(raw.login, "alice", "pw")
            assert jid.startswith("alice@acme.example/")
            raw.send("<presence/>")
            for stanza in BAD_STANZAS:
                raw.send(stanza)
            # the session is alive and in order: a ping sent after all of them is answered
            raw.send("<iq type='get' id='final-ping' to='acme.example'><ping xmlns='urn:xmpp:ping'/></iq>")
            seen = await asyncio.to_thread(raw.read_until, "<iq[^>]*id=.final-ping.[^>]*>", 30)
            # Prosody itself refuses malformed addresses and invalid stanzas before any module
            for bad in ("bad-jid-1", "bad-jid-2", "bad-jid-3", "bad-jid-4"):
                assert condition_of(seen, bad) == "jid-malformed", bad
            assert condition_of(seen, "odd-6") == "bad-request"  # an IQ must have one child
            assert condition_of(seen, "odd-9") == "bad-request"  # no such presence type
            # an address Prosody accepts but the decision service cannot parse: refused (fail
            # closed), saying why, not "unavailable"
            answer = stanza_with_id(seen, "bad-jid-5")
            assert "<policy-violation" in answer and "cannot be decided: field" in answer, answer
            # no 'to': decided, and handled as addressed to the sender's account
            assert "<body>no to at all</body>" in stanza_with_id(seen, "no-to-1")
            assert "type='result'" in stanza_with_id(seen, "no-to-3")
            # what the policy allows arrives, intact (the escapes), in full (the huge body)
            bodies = []
            while len(bodies) < 5:
                message = await next_message(bob, 20)
                bodies.append(message["body"])
            assert bodies[0] == "odd type"
            assert bodies[1] == "after deep"
            assert "hello" in bodies[2] or "Hallo" in bodies[2]
            assert bodies[3] == ESCAPES.replace("&amp;", "&").replace("&lt;", "<")
            assert bodies[4] == "x" * HUGE
        finally:
            raw.close()
            bob.disconnect()

    asyncio.run(scenario())
    assert deployment.errors_in_logs() == []
    # the only refusal by the adapter is the policy's (here the fail mode's) own decision
    refusals = [line for line in deployment.acme.log_text().splitlines() if "no decision for" in line]
    assert len(refusals) == 1 and "bad domain 'acme..example'" in refusals[0], refusals


def stanza_with_id(text: str, stanza_id: str) -> str:
    match = re.search(f"<(message|presence|iq)\\b[^>]*id='{stanza_id}'[^>]*?(/>|>.*?</\\1>)", text, re.S)
    assert match, f"no answer to {stanza_id} in {text[:3000]}"
    return match.group(0)


def condition_of(text: str, stanza_id: str) -> str:
    match = re.search(
        r"<error[^>]*><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'", stanza_with_id(text, stanza_id)
    )
    return match.group(1) if match else ""
