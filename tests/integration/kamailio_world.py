"""The Kamailio deployment of the adapter tests (tests/integration/test_kamailio_adapter.py): one
Kamailio with the adapter and a policy exercising every event kind and effect, registered user
agents (tests/sip_agent.py), an SBC and a partner agent reached through the adapter's static routes
(there is no DNS here), all on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from tests.servers.kamailio import KamailioServer
from tests.sip_agent import SipAgent

POLICY = """\
policy "kamailio-adapter"
local domains ["acme.example"]
default deny "not permitted by the test policy"

rule refused_login:
  on login
  when sender.user == "mallory"
  deny "mallory may not register"

rule logins:
  on login
  allow

rule flood:
  on message
  when sender.user == "flooder"
  limit 5 per minute by sender
  deny "too many messages"

rule no_secrets:
  on message
  when body.contains("secret")
  deny "REASON_TEXT"

rule silently_dropped:
  on message
  when body.contains("drop me")
  drop

rule moved:
  on message
  when recipient.user == "oldbob"
  redirect to "sip:bob@acme.example"

rule partner_chat:
  on message
  when recipient.domain == "partner.example"
  allow
  copy to "sip:archive@acme.example"
  disclaimer "Archived by ACME."

rule no_files:
  on file
  deny "file transfer is not allowed"

rule partner_calls:
  on call
  when recipient.domain == "partner.example"
  allow
  route via "sip:SBC_ADDRESS"

rule eve_may_not_watch:
  on subscribe
  when sender.user == "eve"
  deny "eve may not see presence"

rule hidden_presence:
  on presence
  when sender.user == "hidden"
  deny "hidden users publish no presence"

rule internal:
  when direction == "internal"
  allow

rule to_the_server_itself:
  on message
  when recipient.domain == "127.0.0.1"
  allow
"""


def policy_text(sbc: SipAgent, reason: str = "no secrets over SIP") -> str:
    return POLICY.replace("SBC_ADDRESS", f"127.0.0.1:{sbc.port}").replace("REASON_TEXT", reason)


class World:
    """The Kamailio under test and the user agents around it."""

    def __init__(self, tmp: Path):
        self.sbc = SipAgent("sbc", "sbc.example", ("127.0.0.1", 9))  # proxy set once Kamailio runs
        self.partner = SipAgent("dave", "partner.example", ("127.0.0.1", 9))
        self.server = KamailioServer(
            tmp, policy_text(self.sbc), routes={"partner.example": f"sip:127.0.0.1:{self.partner.port}"}
        )
        self.agents: dict[str, SipAgent] = {}
        self.server.start()
        try:
            proxy = ("127.0.0.1", self.server.port)
            self.sbc.proxy = self.partner.proxy = proxy
            for user in ("alice", "bob", "archive", "eve", "flooder", "hidden"):
                agent = SipAgent(user, "acme.example", proxy)
                self.agents[user] = agent
                response = agent.register()
                assert response is not None and response.status == 200, (
                    f"{user} could not register: {response}"
                )
        except BaseException:
            self.close()  # no Kamailio left running behind a failed set-up
            raise

    def __getitem__(self, user: str) -> SipAgent:
        return self.agents[user]

    def close(self) -> None:
        for agent in [*self.agents.values(), self.sbc, self.partner]:
            agent.close()
        self.server.stop()

    def audit_records(self, until=None, timeout: float = 3.0) -> list[dict]:
        """The audit log's records, once `until(records)` holds (the workers spool records and
        a timer process chains them into the log every 100 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.server.audit_log.read_text() if self.server.audit_log.exists() else ""
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            if until is None or until(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def running_world(workdir: Path) -> Iterator[World]:
    """The body of a World fixture: a started World, closed afterwards; Kamailio must still be
    alive then, and the adapter must have raised nothing."""
    world = World(workdir)
    yield world
    try:
        assert world.server.alive(), "Kamailio died during the tests"
        assert world.server.python_errors() == [], "the adapter raised:\n" + "\n".join(
            world.server.python_errors()
        )
    finally:
        world.close()
