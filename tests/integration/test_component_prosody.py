"""The decision service as an XEP-0114 component of a real Prosody, asked by a real slixmpp client."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.servers.prosody import ProsodyServer
from tests.xmpp_client import TestClient

NS = "urn:policyplug:decision:1"
POLICY = 'policy "component-test"\nlocal domains ["acme.example"]\ndefault deny "no"\n' \
         'rule internal:\n  when direction == "internal"\n  allow\n'


def decide_iq(client: TestClient, payload: str):  # type: ignore[no-untyped-def]
    iq = client.make_iq_get(ito="policy.acme.example")
    element = ET.Element(f"{{{NS}}}decide")
    element.text = payload
    iq.append(element)
    return iq.send(timeout=10)


async def ask(client: TestClient, event: dict) -> dict:
    result = await decide_iq(client, json.dumps(event))
    answer = result.xml.find(f"{{{NS}}}decision")
    assert answer is not None, result
    return json.loads(answer.text)


def test_component_answers_decisions_and_reconnects(tmp_path: Path) -> None:
    server = ProsodyServer(tmp_path / "prosody", components={"policy.acme.example": "s3cret"})
    server.start()
    server.register("alice", "acme.example", "pw")
    policy = tmp_path / "p.policy"
    policy.write_text(POLICY)
    service = subprocess.Popen(
        [sys.executable, "-m", "policyplug", "serve", str(policy), "--component", "policy.acme.example",
         "--secret", "s3cret", "--server", f"127.0.0.1:{server.component_port}", "--socket", str(tmp_path / "s.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.wait_for_component()

        async def scenario() -> None:
            client = TestClient("alice@acme.example", "pw")
            await client.login(server.c2s_port)
            internal = await ask(client, {"kind": "message", "from": "alice@acme.example", "to": "bob@acme.example"})
            assert (internal["decision"], internal["rule"], internal["policy"]) == ("allow", "internal", "component-test")
            outside = await ask(client, {"kind": "message", "from": "alice@acme.example", "to": "x@other.example"})
            assert (outside["decision"], outside["reason"]) == ("deny", "no")
            with pytest.raises(IqError) as caught:
                await decide_iq(client, '{"kind": "message", "from": "alice@acme.example"}')
            assert caught.value.condition == "bad-request" and caught.value.text == "field 'to': missing"
            with pytest.raises(IqError) as caught:
                await decide_iq(client, "not json")
            assert caught.value.text.startswith("not JSON")
            info = await client.plugin["xep_0030"].get_info(jid="policy.acme.example", timeout=10)
            assert NS in info["disco_info"]["features"]
            items = await client.plugin["xep_0030"].get_items(jid="policy.acme.example",
                                                              node="http://jabber.org/protocol/commands", timeout=10)
            assert {"status", "reload", "decide"} <= {item[1] for item in items["disco_items"]["items"]}
            client.disconnect()

        asyncio.run(scenario())

        server.restart()  # the server goes away and comes back: the component reconnects with backoff
        server.register("alice", "acme.example", "pw")

        async def after_restart() -> None:
            client = TestClient("alice@acme.example", "pw")
            await client.login(server.c2s_port)
            deadline = time.monotonic() + 40
            while True:
                try:
                    answer = await ask(client, {"kind": "message", "from": "alice@acme.example", "to": "b@acme.example"})
                    break
                except IqError:
                    assert time.monotonic() < deadline, "component did not come back"
                    await asyncio.sleep(0.5)
            assert answer["decision"] == "allow"
            client.disconnect()

        asyncio.run(after_restart())
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
        server.stop()
