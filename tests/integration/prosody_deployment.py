"""A whole deployment for the Prosody adapter tests: the company's Prosody (acme.example, with
mod_policyplug, a MUC component rooms.acme.example and the decision service's component
policy.acme.example), a second Prosody as the outside world (partner.example, no policyplug, reached
over real s2s on loopback), and `policyplug serve` answering over its Unix socket and as component.

The module asks the service over the transport the deployment is built for ("socket" or
"component"); the service always offers both, so a test can stop and restart it either way.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slixmpp.xmlstream import ET

from tests.servers.prosody import ProsodyServer, link_s2s
from tests.xmpp_client import TestClient

ROOT = Path(__file__).resolve().parent.parent.parent
ADAPTER = ROOT / "adapters" / "prosody"
POLICY = Path(__file__).resolve().parent / "policies" / "prosody-adapter.policy"
ACME_USERS = ["alice", "bob", "new", "old", "archive", "banned", "carol"]
PARTNER_USERS = ["dave", "erin"]
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class Deployment:
    def __init__(
        self,
        workdir: Path,
        transport: str = "socket",
        fail_mode: str = "closed",
        timeout: float = 1,
        policy: Path = POLICY,
        extra_options: dict[str, Any] | None = None,
    ):
        assert transport in ("socket", "component")
        self.workdir = workdir
        self.transport = transport
        self.policy = policy
        self.socket = workdir / "svc.sock"
        self.service_log = workdir / "service.log"
        where = (
            {"policyplug_socket": str(self.socket)}
            if transport == "socket"
            else {"policyplug_component": "policy.acme.example"}
        )
        self.acme = ProsodyServer(
            workdir / "acme",
            hosts=["acme.example"],
            components={"policy.acme.example": "s3cret"},
            internal_components={"rooms.acme.example": "muc"},
            plugin_paths=[str(ADAPTER)],
            host_options={
                "acme.example": {
                    "modules_enabled": ["policyplug"],
                    "policyplug_timeout": timeout,
                    "policyplug_fail_mode": fail_mode,
                    **where,
                    **(extra_options or {}),
                },
                # rooms open on first join (no XEP-0045 configuration step)
                "rooms.acme.example": {"muc_room_locking": False},
            },
        )
        self.partner = ProsodyServer(workdir / "partner", hosts=["partner.example"])
        link_s2s(self.acme, self.partner)
        self.service: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self.acme.start()
            self.partner.start()
            for user in ACME_USERS:
                self.acme.register(user, "acme.example", "pw")
            for user in PARTNER_USERS:
                self.partner.register(user, "partner.example", "pw")
            self.start_service()
        except BaseException:
            self.stop()  # a fixture that fails to start never reaches its teardown
            raise

    def socket_connections(self) -> int:
        return self.acme.log_text().count("connected to the decision service at")

    def start_service(self) -> None:
        """Start `policyplug serve` and wait until the module can reach it over its transport."""
        components, sockets = self.acme.component_logins(), self.socket_connections()
        with open(self.service_log, "ab") as log:
            self.service = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "policyplug",
                    "serve",
                    str(self.policy),
                    "--component",
                    "policy.acme.example",
                    "--secret",
                    "s3cret",
                    "--server",
                    f"127.0.0.1:{self.acme.component_port}",
                    "--socket",
                    str(self.socket),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.acme.wait_for_component(components, timeout=60)
        if self.transport == "socket":  # the module retries its connection every second
            deadline = time.monotonic() + 30
            while self.socket_connections() <= sockets:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "mod_policyplug did not connect to the service's socket:\n"
                        + self.acme.log_text()[-3000:]
                    )
                time.sleep(0.1)

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
            self.service = None

    def stop(self) -> None:
        self.stop_service()
        self.acme.stop()
        self.partner.stop()

    def port_of(self, jid: str) -> int:
        return self.partner.c2s_port if jid.endswith("@partner.example") else self.acme.c2s_port

    def errors_in_logs(self) -> list[str]:
        """Error lines and Lua tracebacks in both servers' logs."""
        lines = []
        for server in (self.acme, self.partner):
            for line in server.log_text().splitlines():
                if "\terror\t" in line or "traceback" in line.lower():
                    lines.append(line)
        return lines


def running(workdir: Path, *, clean_logs: bool = True, **options: Any) -> Iterator[Deployment]:
    """The body of every deployment fixture: a started Deployment (`options` as Deployment's),
    stopped afterwards; with `clean_logs`, no Lua error or traceback may be left in either server's log."""
    d = Deployment(workdir, **options)
    d.start()
    yield d
    d.stop()
    if clean_logs:
        assert d.errors_in_logs() == []


async def login(deployment: Deployment, *jids: str) -> list[TestClient]:
    clients = []
    for jid in jids:
        client = TestClient(jid, "pw")
        await client.login(deployment.port_of(jid))
        clients.append(client)
    return clients


async def next_message(client: TestClient, timeout: float = 10.0, skip=None):  # type: ignore[no-untyped-def]
    """The next message the client receives (skipping those `skip(msg)` is true for)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(client.messages.get(), max(0.01, deadline - time.monotonic()))
        if skip is None or not skip(message):
            return message


async def nothing_arrives(client: TestClient, wait: float = 1.5, skip=None) -> bool:  # type: ignore[no-untyped-def]
    try:
        message = await next_message(client, wait, skip)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message: {message}")


def error_condition(stanza) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(condition, text) read from the XML: slixmpp does not know every RFC 6120 condition by name."""
    error = next((child for child in stanza.xml if child.tag.endswith("}error")), None)
    assert error is not None, stanza
    condition = next(
        c.tag.split("}")[1] for c in error if c.tag.startswith("{" + STANZAS) and not c.tag.endswith("}text")
    )
    text = error.find(f"{{{STANZAS}}}text")
    return condition, text.text if text is not None else ""


def element(xml: str) -> ET.Element:
    return ET.fromstring(xml)
