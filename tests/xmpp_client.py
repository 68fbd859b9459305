"""A small slixmpp client for integration tests (plain TCP to a test Prosody on loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath


class TestClient(slixmpp.ClientXMPP):
    __test__ = False  # not a pytest class

    def __init__(self, jid: str, password: str):
        super().__init__(jid, password)
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.register_plugin("xep_0030")
        self.messages: asyncio.Queue[Any] = asyncio.Queue()  # messages with a body, and message errors
        self.all_messages: asyncio.Queue[Any] = asyncio.Queue()  # every message stanza, body or not
        self.presences: asyncio.Queue[Any] = asyncio.Queue()  # every presence stanza
        self.iq_answers: asyncio.Queue[Any] = asyncio.Queue()  # every IQ result or error (raw)
        self.ready = asyncio.Event()
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("message", lambda msg: self.messages.put_nowait(msg))
        self.add_event_handler("message_error", lambda msg: self.messages.put_nowait(msg))
        self.add_event_handler("failed_auth", lambda _: self.ready.set())
        self.add_event_handler("presence", lambda presence: self.presences.put_nowait(presence))
        self.register_handler(
            Callback(
                "AllMessages",
                MatchXPath("{jabber:client}message"),
                lambda msg: self.all_messages.put_nowait(msg),
            )
        )
        # raw, because slixmpp cannot parse every error condition (e.g. policy-violation) in IQs
        self.register_handler(Callback("IqAnswers", MatchXPath("{jabber:client}iq"), self._iq_answer))

    def _iq_answer(self, iq: Any) -> None:
        if iq["type"] in ("result", "error"):
            self.iq_answers.put_nowait(iq)

    async def _started(self, _: Any) -> None:
        # like a real client: fetch the roster first (Prosody sends roster-related presence, such
        # as a refused subscription, only to resources that have), then announce availability
        await self.get_roster(timeout=20)
        self.send_presence()
        self.ready.set()

    async def login(self, port: int, timeout: float = 20) -> None:
        self.connect("127.0.0.1", port)
        await asyncio.wait_for(self.ready.wait(), timeout)
        if not self.authenticated:
            raise RuntimeError(f"{self.boundjid} could not log in")
