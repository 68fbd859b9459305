"""The XMPP transport: an external component (XEP-0114) built on slixmpp.

Decision requests arrive as IQs in our namespace, the event JSON as the element's text:

  <iq type='get' to='policy.example.com' id='X'><decide xmlns='urn:policyplug:decision:1'>{...}</decide></iq>
  <iq type='result' id='X'><decision xmlns='urn:policyplug:decision:1'>{...}</decision></iq>

A malformed request gets an IQ error (bad-request) whose text names what is wrong. Operators
get XEP-0030 discovery and XEP-0050 ad-hoc commands: status, reload, and deciding a test event.

Who may ask (docs/service.md, docs/security.md): decision IQs only from the server the component
serves (its parent domain, `policy.acme.example` -> `acme.example`) and the JIDs given with
`--component-client`; ad-hoc commands only from the `--admin` JIDs (none given: nobody). Anyone
else gets `forbidden`, is logged (once a minute per sender) and counted, and nothing is decided
or audited. A server stamps the `from` of what its users send, and a remote server can only send
from its own domains, so no user, local or remote, can pose as the server's domain.

One supervisor task keeps the connection: one attempt at a time, and after a failure or a lost
stream it waits an exponential backoff with jitter (the delay logged is the delay waited).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterable
from typing import Any, ClassVar

from slixmpp import JID, ComponentXMPP
from slixmpp.stanza import Iq
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from ..events import EventError
from .server import DecisionService

NS = "urn:policyplug:decision:1"
log = logging.getLogger("policyplug.service.component")

BACKOFF_FIRST = 1.0  # seconds: the ceiling of the first retry's delay
BACKOFF_MAX = 30.0  # seconds: the ceiling never grows beyond this
REFUSAL_LOG_EVERY = 60.0  # seconds between log lines about one refused sender


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """The wait before the next connection attempt after `failures` failed ones in a row
    (0: the connection was up and went away). Exponential ("equal jitter"): the ceiling doubles
    from BACKOFF_FIRST up to BACKOFF_MAX, the delay is uniform in [ceiling/2, ceiling], so
    services restarted together do not retry in lockstep."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(failures, 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


def parent_domain(component_jid: str) -> str | None:
    """The domain a component serves: its JID minus the first label (policy.acme.example ->
    acme.example); None for a one-label JID."""
    domain = JID(component_jid).domain
    _, dot, parent = domain.partition(".")
    return parent if dot and parent else None


class _Allowed:
    """A set of JIDs: an entry without a resource matches every resource of its bare JID."""

    def __init__(self, jids: Iterable[str]):
        self.bare: set[str] = set()
        self.full: set[str] = set()
        for text in jids:
            jid = JID(text)  # normalised (stringprep, case) as the stanzas' addresses are
            (self.full if jid.resource else self.bare).add(jid.full if jid.resource else jid.bare)

    def __contains__(self, jid: JID) -> bool:
        return jid.bare in self.bare or jid.full in self.full

    def __bool__(self) -> bool:
        return bool(self.bare or self.full)

    def describe(self) -> str:
        return ", ".join(sorted(self.bare | self.full)) or "nobody"


class DecideRequest(ElementBase):
    name = "decide"
    namespace = NS
    plugin_attrib = "policyplug_decide"
    interfaces: ClassVar[set[str]] = set()


class DecisionAnswer(ElementBase):
    name = "decision"
    namespace = NS
    plugin_attrib = "policyplug_decision"
    interfaces: ClassVar[set[str]] = set()


class PolicyComponent(ComponentXMPP):
    def __init__(
        self,
        service: DecisionService,
        jid: str,
        secret: str,
        host: str,
        port: int,
        *,
        clients: Iterable[str] = (),
        admins: Iterable[str] = (),
        metrics: Any = None,
    ):
        # fix_error_ns: error elements in the component namespace, or Prosody cannot parse our error answers
        super().__init__(jid, secret, host, port, fix_error_ns=True)
        self.enable_direct_tls = False  # XEP-0114 is plain TCP to the server's component port (loopback)
        self.service = service
        self.server_host, self.server_port = host, port
        served = parent_domain(jid)
        self.clients = _Allowed([*([served] if served else []), *clients])
        self.admins = _Allowed(admins)
        self.metrics = metrics
        self.refused: dict[str, int] = {"decide": 0, "command": 0}
        self._refusal_logged: dict[tuple[str, str], tuple[float, int]] = {}  # (what, jid) -> (when, since)
        self.stopping = False
        self.connections = 0  # sessions started (a test reads it)
        self.connected_event = asyncio.Event()
        self._stream_ended = asyncio.Event()
        self._had_session = False
        self._features_added = False
        self._supervisor: asyncio.Task[None] | None = None
        register_stanza_plugin(Iq, DecideRequest)
        register_stanza_plugin(Iq, DecisionAnswer)
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0004")
        self.register_plugin("xep_0050")
        # every command request (each step of a session too) passes the admin check first
        self.remove_handler("Ad-Hoc Execute")
        # (the handlers take an Iq: these paths match iq stanzas only, which slixmpp's types cannot say)
        self.register_handler(Callback("policyplug ad-hoc", StanzaPath("iq@type=set/command"), self._command))  # type: ignore[arg-type]
        self.register_handler(
            Callback("policyplug decide", StanzaPath("iq@type=get/policyplug_decide"), self._decide)  # type: ignore[arg-type]
        )
        self.register_handler(
            Callback("policyplug decide (set)", StanzaPath("iq@type=set/policyplug_decide"), self._decide)  # type: ignore[arg-type]
        )
        self.add_event_handler("session_start", self._session_start)
        self.add_event_handler("disconnected", self._disconnected)
        if not self.clients:
            log.warning(
                "component %s: no --component-client and no parent domain: decision IQs are refused", jid
            )
        log.info(
            "component %s answers decisions for %s; ad-hoc commands for %s",
            jid,
            self.clients.describe(),
            self.admins.describe(),
        )

    # -- the connection ------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Connect, and stay connected until stop()."""
        self._supervisor = asyncio.get_running_loop().create_task(self._keep_connected())
        return self._supervisor

    def reschedule_connection_attempt(self) -> None:  # type: ignore[override]
        # slixmpp would start another attempt loop of its own; the supervisor is the only one
        return None

    async def _keep_connected(self) -> None:
        failures = 0
        while not self.stopping:
            self._had_session = False
            self._stream_ended.clear()
            try:
                await self.connect(self.server_host, self.server_port)  # one attempt (see above)
            except OSError as exc:
                log.debug("component connection attempt: %s", exc)
            if self.transport is not None:
                await self._stream_ended.wait()  # connected: until the stream ends (or the handshake fails)
            if self.stopping:
                return
            failures = 0 if self._had_session else failures + 1
            delay = backoff_delay(failures)
            log.warning(
                "component %s %s %s:%s; reconnecting in %.1f s",
                self.boundjid,
                "lost its connection to" if self._had_session else "could not connect to",
                self.server_host,
                self.server_port,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session_start(self, _: Any) -> None:
        self._had_session = True
        self.connections += 1
        self.connected_event.set()
        if not self._features_added:
            self._features_added = True
            self["xep_0030"].add_feature(NS)
            self["xep_0030"].add_identity(
                category="component", itype="generic", name="policyplug decision service"
            )
            commands = self["xep_0050"]
            commands.add_command(node="status", name="Show status", handler=self._cmd_status)
            commands.add_command(node="reload", name="Reload the policy", handler=self._cmd_reload)
            commands.add_command(node="decide", name="Decide a test event", handler=self._cmd_decide)
        log.info("component %s connected to %s:%s", self.boundjid, self.server_host, self.server_port)

    def _disconnected(self, _: Any) -> None:
        self.connected_event.clear()
        self._stream_ended.set()

    # -- who may ask ---------------------------------------------------------------------------------------

    def _refuse(self, iq: Iq, what: str) -> None:
        """Answer `forbidden`, count it, log it (once a minute per sender and request type)."""
        self.refused[what] += 1
        if self.metrics is not None:
            self.metrics.component_refused(what)
        sender = iq["from"].full
        now = time.monotonic()
        key = (what, sender)
        last, since = self._refusal_logged.get(key, (0.0, 0))
        if now - last >= REFUSAL_LOG_EVERY:
            if len(self._refusal_logged) > 10000:  # a flood of senders cannot grow this without bound
                self._refusal_logged.clear()
            self._refusal_logged[key] = (now, 0)
            log.warning(
                "component: refused a %s request from %s (%s)%s",
                what,
                sender,
                "not a --component-client" if what == "decide" else "not an --admin",
                f"; {since} more from it since the last line" if since else "",
            )
        else:
            self._refusal_logged[key] = (last, since + 1)
        reply = iq.reply(clear=True)
        reply["error"]["type"] = "auth"
        reply["error"]["condition"] = "forbidden"
        reply["error"]["text"] = (
            "only the server this component serves may ask for decisions"
            if what == "decide"
            else "ad-hoc commands are for the service's administrators"
        )
        reply.send()

    def _command(self, iq: Iq) -> None:
        if iq["from"] not in self.admins:
            self._refuse(iq, "command")
            return
        self["xep_0050"]._handle_command(iq)  # slixmpp's own handler, which this one replaces

    # -- decision IQs ------------------------------------------------------------------------------------

    def _decide(self, iq: Iq) -> None:
        if iq["from"] not in self.clients:
            self._refuse(iq, "decide")
            return
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

    async def _cmd_reload(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        # off the event loop like every reload (docs/service.md): decisions go on while it loads
        result = await self.service.reload_async("ad-hoc command")
        fields = {k: str(v) for k, v in result.items()}
        session["payload"] = self._result_form("reload " + ("done" if result["ok"] else "rejected"), fields)
        session["next"] = None
        session["has_next"] = False
        return session

    def _cmd_decide(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        form = self["xep_0004"].make_form(ftype="form", title="Decide a test event")
        form.add_field(
            var="event",
            ftype="text-multi",
            label="Event JSON",
            value='{"kind": "message", "from": "alice@example.com", "to": "bob@example.net"}',
        )
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
        self._stream_ended.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
        self.disconnect()
