"""The decision service as an XEP-0114 component of a real Prosody, asked by real slixmpp clients:
who may ask it (docs/service.md, docs/security.md), what it answers, and how it keeps its connection
when Prosody is down at start or restarts."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.servers import free_port
from tests.servers.prosody import ProsodyServer, link_s2s
from tests.xmpp_client import TestClient

NS = "urn:policyplug:decision:1"
COMMANDS = "http://jabber.org/protocol/commands"
POLICY = (
    'policy "component-test"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
    'rule internal:\n  when direction == "internal"\n  allow\n'
)


def decide_iq(client: TestClient, payload: str):  # type: ignore[no-untyped-def]
    iq = client.make_iq_get(ito="policy.acme.example")
    element = ET.Element(f"{{{NS}}}decide")
    element.text = payload
    iq.append(element)
    return iq.send(timeout=10)


def command_iq(client: TestClient, node: str):  # type: ignore[no-untyped-def]
    iq = client.make_iq_set(ito="policy.acme.example")
    iq.append(ET.Element(f"{{{COMMANDS}}}command", {"node": node, "action": "execute"}))
    return iq.send(timeout=10)


async def ask(client: TestClient, event: dict) -> dict:
    result = await decide_iq(client, json.dumps(event))
    answer = result.xml.find(f"{{{NS}}}decision")
    assert answer is not None, result
    return json.loads(answer.text)


def start_service(tmp_path: Path, server_port: int, *extra: str) -> subprocess.Popen[str]:
    policy = tmp_path / "p.policy"
    policy.write_text(POLICY)
    log = open(tmp_path / "service.log", "a")  # noqa: SIM115 (the child writes it; closed with the test dir)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--component",
            "policy.acme.example",
            "--secret",
            "s3cret",
            "--server",
            f"127.0.0.1:{server_port}",
            "--socket",
            str(tmp_path / "s.sock"),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_service(service: subprocess.Popen[str]) -> None:
    service.send_signal(signal.SIGTERM)
    try:
        service.wait(timeout=20)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_who_may_ask_the_component(tmp_path: Path) -> None:
    """Decisions only for the served server and --component-client JIDs, commands only for --admin
    JIDs; an ordinary account and a remote user over s2s get `forbidden`, logged, counted, unaudited."""
    acme = ProsodyServer(tmp_path / "acme", components={"policy.acme.example": "s3cret"})
    partner = ProsodyServer(tmp_path / "partner", hosts=["partner.example"])
    link_s2s(acme, partner)
    acme.start()
    partner.start()
    for user in ("decider", "mallory", "admin"):
        acme.register(user, "acme.example", "pw")
    partner.register("eve", "partner.example", "pw")
    metrics_port = free_port()
    audit = tmp_path / "audit.jsonl"
    service = start_service(
        tmp_path,
        acme.component_port,
        "--component-client",
        "decider@acme.example",
        "--admin",
        "admin@acme.example",
        "--audit-log",
        str(audit),
        "--audit-level",
        "all",
        "--metrics-port",
        str(metrics_port),
    )
    try:
        acme.wait_for_component()

        async def scenario() -> None:
            decider, mallory, admin = (
                TestClient(f"{user}@acme.example", "pw") for user in ("decider", "mallory", "admin")
            )
            eve = TestClient("eve@partner.example", "pw")
            for client in (decider, mallory, admin):
                await client.login(acme.c2s_port)
            await eve.login(partner.c2s_port)

            # a listed client: decisions, and bad requests named
            internal = await ask(
                decider, {"kind": "message", "from": "alice@acme.example", "to": "bob@acme.example"}
            )
            assert (internal["decision"], internal["rule"], internal["policy"]) == (
                "allow",
                "internal",
                "component-test",
            )
            outside = await ask(
                decider, {"kind": "message", "from": "alice@acme.example", "to": "x@other.example"}
            )
            assert (outside["decision"], outside["reason"]) == ("deny", "no")
            with pytest.raises(IqError) as caught:
                await decide_iq(decider, '{"kind": "message", "from": "alice@acme.example"}')
            assert caught.value.condition == "bad-request" and caught.value.text == "field 'to': missing"
            with pytest.raises(IqError) as caught:
                await decide_iq(decider, "not json")
            assert caught.value.text.startswith("not JSON")

            # an ordinary account of the server, and a remote user over s2s: forbidden, made-up event
            made_up = {"kind": "message", "from": "ceo@acme.example", "to": "rival@competitor.example"}
            for client in (mallory, eve):
                with pytest.raises(IqError) as caught:
                    await ask(client, made_up)
                assert caught.value.condition == "forbidden", caught.value
                assert "rival" not in str(caught.value.iq)  # no decision, no trace

            # ad-hoc commands: forbidden to everyone but the admin (the decider included)
            for client in (mallory, decider, eve):
                for node in ("reload", "status", "decide"):
                    with pytest.raises(IqError) as caught:
                        await command_iq(client, node)
                    assert caught.value.condition == "forbidden", (client.boundjid, node, caught.value)
            status = await command_iq(admin, "status")
            fields = {field.get("var") for field in status.xml.iter("{jabber:x:data}field")}
            assert {"policy", "revision"} <= fields, status
            reload = await command_iq(admin, "reload")
            assert reload.xml.find(f"{{{COMMANDS}}}command").get("status") == "completed"

            info = await mallory.plugin["xep_0030"].get_info(jid="policy.acme.example", timeout=10)
            assert NS in info["disco_info"]["features"]  # discovery stays open: it says what the JID is
            for client in (decider, mallory, admin, eve):
                client.disconnect()

        asyncio.run(scenario())
        assert metric(metrics_port, "policyplug_component_refused_total", 'request="decide"') == 2
        assert metric(metrics_port, "policyplug_component_refused_total", 'request="command"') == 9
    finally:
        stop_service(service)
        acme.stop()
        partner.stop()
    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    audited = {(r["event"]["from"], r["event"]["to"]) for r in records if "event" in r}
    assert ("alice@acme.example", "x@other.example") in audited  # the listed client's decisions are audited
    assert not any("competitor" in line for line in audit.read_text().splitlines())  # the refused ones not
    log = (tmp_path / "service.log").read_text()
    assert "refused a decide request from mallory@acme.example/" in log
    assert "refused a decide request from eve@partner.example/" in log
    assert "refused a command request from mallory@acme.example/" in log


def _log_times(log: str, pattern: str) -> list[tuple[float, re.Match[str]]]:
    found = []
    for line in log.splitlines():
        match = re.search(pattern, line)
        if match:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, match))
    return found


def test_one_reconnect_loop_with_backoff(tmp_path: Path) -> None:
    """The service starts before Prosody, Prosody restarts twice: one connection attempt at a time
    (Prosody never sees a second component), the delay logged is the delay waited, decisions come back."""
    server = ProsodyServer(tmp_path / "prosody", components={"policy.acme.example": "s3cret"})
    service = start_service(tmp_path, server.component_port, "--component-client", "alice@acme.example")
    service_log = tmp_path / "service.log"
    try:
        deadline = time.monotonic() + 30
        while service_log.read_text().count("could not connect to") < 3:  # down at start: retries back off
            assert time.monotonic() < deadline and service.poll() is None, service_log.read_text()
            time.sleep(0.2)
        server.start()
        server.register("alice", "acme.example", "pw")
        server.wait_for_component(0, timeout=60)

        async def decided() -> Any:
            client = TestClient("alice@acme.example", "pw")
            await client.login(server.c2s_port)
            deadline = time.monotonic() + 40
            while True:
                try:
                    answer = await ask(
                        client, {"kind": "message", "from": "alice@acme.example", "to": "b@acme.example"}
                    )
                    break
                except IqError:  # Prosody answers for a component that is not (yet) connected
                    assert time.monotonic() < deadline, "component did not come back"
                    await asyncio.sleep(0.5)
            client.disconnect()
            return answer

        assert asyncio.run(decided())["decision"] == "allow"
        for restart in (1, 2):
            logins = server.component_logins()
            server.stop()
            time.sleep(1.5 * restart)  # down for a while: a few attempts fail
            server.start()
            server.register("alice", "acme.example", "pw")
            server.wait_for_component(logins, timeout=60)
            assert asyncio.run(decided())["decision"] == "allow"
        time.sleep(3)  # a stray second loop would try again within this
        prosody_log = server.log_text()
        assert prosody_log.count("Second component attempted to connect") == 0
        assert server.component_logins() == 3
    finally:
        stop_service(service)
        server.stop()
    log = service_log.read_text()
    assert log.count("component policy.acme.example connected to") == 3
    assert "Received data before the connection is established" not in log
    # every logged delay is the delay waited: an attempt that fails at once (port closed) is logged
    # right after the delay the line before it announced
    events = _log_times(
        log,
        r"(could not connect to|lost its connection to|connected to) [^\s;]+(?:; reconnecting in ([0-9.]+) s)?",
    )
    checked = 0
    for (at, match), (next_at, next_match) in zip(events, events[1:], strict=False):
        if match.group(2) and next_match.group(1) == "could not connect to":
            logged = float(match.group(2))
            assert logged - 0.05 <= next_at - at <= logged + 2.0, (logged, next_at - at, log)
            checked += 1
    assert checked >= 3, log
    failures = _log_times(log, r"could not connect to \S+; reconnecting in ([0-9.]+) s")
    # exponential: within the first outage the ceilings double (delays in [ceiling/2, ceiling])
    first_outage = [float(m.group(1)) for _, m in failures[:3]]
    assert (
        1.0 <= first_outage[0] <= 2.0 and 2.0 <= first_outage[1] <= 4.0 and 4.0 <= first_outage[2] <= 8.0
    ), log
