"""A small slixmpp client for integration tests (plain TCP to a test Prosody on loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import slixmpp


class TestClient(slixmpp.ClientXMPP):
    __test__ = False  # not a pytest class

    def __init__(self, jid: str, password: str):
        super().__init__(jid, password)
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.register_plugin("xep_0030")
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("message", lambda msg: self.messages.put_nowait(msg))
        self.add_event_handler("message_error", lambda msg: self.messages.put_nowait(msg))
        self.add_event_handler("failed_auth", lambda _: self.ready.set())

    async def _started(self, _: Any) -> None:
        self.send_presence()
        self.ready.set()

    async def login(self, port: int, timeout: float = 20) -> None:
        self.connect("127.0.0.1", port)
        await asyncio.wait_for(self.ready.wait(), timeout)
        if not self.authenticated:
            raise RuntimeError(f"{self.boundjid} could not log in")
