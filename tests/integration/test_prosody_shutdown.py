"""Prosody stopping with users online (issue 16.13): their last presences are decided while the
decision service can still answer; what cannot be decided is handled by the fail mode and logged
once, not once per user; no errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.prosody_deployment import Deployment, login

USERS = [
    "alice@acme.example",
    "bob@acme.example",
    "carol@acme.example",
    "new@acme.example",
    "old@acme.example",
]


def stop_with_users_online(deployment: Deployment, service_first: bool = False) -> str:
    """Log the users in, (stop the service,) stop Prosody under them, return what was logged meanwhile."""

    async def scenario() -> None:
        clients = await login(deployment, *USERS)
        await asyncio.sleep(0.5)  # initial presences decided and delivered
        if service_first:
            await asyncio.to_thread(deployment.stop_service)
            await asyncio.sleep(0.5)
        before = len(deployment.acme.log_text())
        await asyncio.to_thread(deployment.acme.stop)  # the clients' loop keeps answering Prosody meanwhile
        deployment.log_after_stop = deployment.acme.log_text()[before:]  # type: ignore[attr-defined]
        for client in clients:
            client.disconnect()

    asyncio.run(scenario())
    return deployment.log_after_stop  # type: ignore[attr-defined]


def test_stop_with_the_service_up_is_quiet(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, transport="socket", timeout=5)
    deployment.start()
    try:
        log = stop_with_users_online(deployment)
    finally:
        deployment.stop()
    assert "Shutdown complete" in log
    assert "no decision for" not in log, log
    assert "Prosody is stopping: stanzas that cannot be decided" not in log  # everything was decided
    assert [line for line in log.splitlines() if "policyplug\twarn" in line] == []  # no reconnecting either
    assert deployment.errors_in_logs() == []


def test_stop_with_the_service_gone_logs_once(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, transport="socket", timeout=5)
    deployment.start()
    try:
        log = stop_with_users_online(deployment, service_first=True)
    finally:
        deployment.stop()
    assert "Shutdown complete" in log
    assert "no decision for" not in log, log
    # the users' last presences could not be decided: one line says so, with the fail mode
    assert log.count("Prosody is stopping: stanzas that cannot be decided now") == 1, log
    assert "are refused (fail mode closed)" in log
    assert [line for line in log.splitlines() if "policyplug\twarn" in line] == []
    assert deployment.errors_in_logs() == []
