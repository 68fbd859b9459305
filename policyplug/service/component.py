"""The XMPP transport: an external component (XEP-0114) built on slixmpp.

Decision requests arrive as IQs in our namespace, the event JSON as the element's text:

  <iq type='get' to='policy.example.com' id='X'><decide xmlns='urn:policyplug:decision:1'>{...}</decide></iq>
  <iq type='result' id='X'><decision xmlns='urn:policyplug:decision:1'>{...}</decision></iq>

A malformed request gets an IQ error (bad-request) whose text names what is wrong. Operators
get XEP-0030 discovery and XEP-0050 ad-hoc commands: status, reload, and deciding a test event.
When the server goes away the component reconnects with exponential backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from slixmpp import ComponentXMPP
from slixmpp.stanza import Iq
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from ..events import EventError
from .server import DecisionService

NS = "urn:policyplug:decision:1"
log = logging.getLogger("policyplug.service.component")


class DecideRequest(ElementBase):
    name = "decide"
    namespace = NS
    plugin_attrib = "policyplug_decide"
    interfaces: set[str] = set()


class DecisionAnswer(ElementBase):
    name = "decision"
    namespace = NS
    plugin_attrib = "policyplug_decision"
    interfaces: set[str] = set()


class PolicyComponent(ComponentXMPP):
    def __init__(self, service: DecisionService, jid: str, secret: str, host: str, port: int):
        # fix_error_ns: error elements in the component namespace, or Prosody cannot parse our error answers
        super().__init__(jid, secret, host, port, fix_error_ns=True)
        self.enable_direct_tls = False  # XEP-0114 is plain TCP to the server's component port (loopback)
        self.service = service
        self.server_host, self.server_port = host, port
        self.backoff = 1.0
        self.stopping = False
        self.connected_event = asyncio.Event()
        register_stanza_plugin(Iq, DecideRequest)
        register_stanza_plugin(Iq, DecisionAnswer)
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0004")
        self.register_plugin("xep_0050")
        self.register_handler(Callback("policyplug decide", StanzaPath("iq@type=get/policyplug_decide"), self._decide))
        self.register_handler(Callback("policyplug decide (set)", StanzaPath("iq@type=set/policyplug_decide"),
                                       self._decide))
        self.add_event_handler("session_start", self._session_start)
        self.add_event_handler("disconnected", self._disconnected)
        self.add_event_handler("connection_failed", self._disconnected)

    async def _session_start(self, _: Any) -> None:
        self.backoff = 1.0
        self.connected_event.set()
        self["xep_0030"].add_feature(NS)
        self["xep_0030"].add_identity(category="component", itype="generic", name="policyplug decision service")
        commands = self["xep_0050"]
        commands.add_command(node="status", name="Show status", handler=self._cmd_status)
        commands.add_command(node="reload", name="Reload the policy", handler=self._cmd_reload)
        commands.add_command(node="decide", name="Decide a test event", handler=self._cmd_decide)
        log.info("component %s connected to %s:%s", self.boundjid, self.server_host, self.server_port)

    def _disconnected(self, _: Any) -> None:
        self.connected_event.clear()
        if self.stopping:
            return
        delay = self.backoff
        self.backoff = min(self.backoff * 2, 30.0)
        log.warning("component disconnected; reconnecting in %.0f s", delay)
        self.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self.stopping:
            self.connect(self.server_host, self.server_port)

    # -- decision IQs ------------------------------------------------------------------------------------

    def _decide(self, iq: Iq) -> None:
        text = iq["policyplug_decide"].xml.text or ""
        try:
            decision = self.service.decide_encoded(json.loads(text)).decode()  # the JSON as the audit has it
        except (ValueError, EventError) as exc:
            self.service.invalid_requests += 1
            message = str(exc) if isinstance(exc, EventError) else f"not JSON: {exc}"
            reply = iq.reply()
            reply["error"]["type"] = "modify"
            reply["error"]["condition"] = "bad-request"
            reply["error"]["text"] = message
            reply.send()
            return
        reply = iq.reply(clear=True)
        reply["policyplug_decision"].xml.text = decision
        reply.send()

    # -- ad-hoc commands ----------------------------------------------------------------------------------

    def _result_form(self, title: str, fields: dict[str, str]) -> Any:
        form = self["xep_0004"].make_form(ftype="result", title=title)
        for name, value in fields.items():
            form.add_field(var=name, ftype="text-single", label=name, value=value)
        return form

    def _cmd_status(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        status = self.service.status()
        fields = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in status.items()}
        session["payload"] = self._result_form("policyplug status", fields)
        session["next"] = None
        session["has_next"] = False
        return session

    def _cmd_reload(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        result = self.service.reload("ad-hoc command")
        fields = {k: str(v) for k, v in result.items()}
        session["payload"] = self._result_form("reload " + ("done" if result["ok"] else "rejected"), fields)
        session["next"] = None
        session["has_next"] = False
        return session

    def _cmd_decide(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        form = self["xep_0004"].make_form(ftype="form", title="Decide a test event")
        form.add_field(var="event", ftype="text-multi", label="Event JSON",
                       value='{"kind": "message", "from": "alice@example.com", "to": "bob@example.net"}')
        session["payload"] = form
        session["next"] = self._cmd_decide_submit
        session["has_next"] = False
        return session

    def _cmd_decide_submit(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        value = payload["values"].get("event", "")
        text = "\n".join(value) if isinstance(value, list) else str(value)
        try:
            data = json.loads(text)
            from ..events import Event
            event = Event.from_json(data)
            decision = self.service.policy.decide(event, explain=True)  # a test: not audited, not counted
            fields = {"decision": json.dumps(decision.to_json()), "trace": decision.explain()}
        except (ValueError, EventError) as exc:
            fields = {"error": str(exc)}
        session["payload"] = self._result_form("decision", fields)
        session["next"] = None
        session["has_next"] = False
        return session

    async def stop(self) -> None:
        self.stopping = True
        self.disconnect()
