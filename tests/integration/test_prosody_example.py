"""examples/prosody/prosody.cfg.lua works: a real Prosody runs that very file (Included; only
ports, paths, logging and TLS overridden for a throwaway server on loopback), the decision service
connects to it as the example says, and the module it loads enforces a policy."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.prosody_deployment import error_condition, next_message, nothing_arrives
from tests.servers.prosody import ProsodyServer
from tests.xmpp_client import TestClient

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "prosody" / "prosody.cfg.lua"
POLICY = Path(__file__).resolve().parent / "policies" / "prosody-example.policy"


def test_the_example_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYPLUG_COMPONENT_SECRET", "example-secret")  # read by the example config
    sock = tmp_path / "policyplug.sock"
    server = ProsodyServer(
        tmp_path / "prosody",
        include=EXAMPLE,
        plugin_paths=[str(ROOT / "adapters" / "prosody")],
        global_options={"policyplug_socket": str(sock)},
    )
    service = None
    server.start()
    try:
        for user in ("alice", "bob"):
            server.register(user, "example.com", "pw")
        with open(tmp_path / "service.log", "wb") as log:
            service = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "policyplug",
                    "serve",
                    str(POLICY),
                    "--socket",
                    str(sock),
                    "--component",
                    "policy.example.com",
                    "--secret",
                    "example-secret",
                    "--server",
                    f"127.0.0.1:{server.component_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server.wait_for_component(timeout=60)  # the example's Component block and secret work

        async def scenario() -> None:
            alice, bob = TestClient("alice@example.com", "pw"), TestClient("bob@example.com", "pw")
            for client in (alice, bob):
                await client.login(server.c2s_port)
            alice.send_message(mto="bob@example.com", mbody="hello", mtype="chat")
            assert (await next_message(bob))["body"] == "hello"
            alice.send_message(mto="bob@example.com", mbody="the secret plan", mtype="chat")
            bounce = await next_message(alice)
            assert error_condition(bounce) == ("policy-violation", "no secrets in chat")
            assert await nothing_arrives(bob, 1.0)
            for client in (alice, bob):
                client.disconnect()

        asyncio.run(scenario())
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=20)
        server.stop()
    log = server.log_text()
    assert "connected to the decision service at" in log
    assert [line for line in log.splitlines() if "\terror\t" in line or "traceback" in line.lower()] == []
