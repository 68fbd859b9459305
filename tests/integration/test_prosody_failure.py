"""mod_policyplug when the decision service is gone or does not answer, over both transports:
fail closed refuses (messages and logins, with a distinct reason), fail open delivers, both are
logged, and a session never hangs: once the service is back, the same session goes on."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration.prosody_deployment import (
    Deployment,
    error_condition,
    login,
    next_message,
    nothing_arrives,
    running,
)
from tests.xmpp_client import TestClient

UNAVAILABLE = ("policy-violation", "policy service unavailable")


def deployment(
    tmp_path_factory: pytest.TempPathFactory, transport: str, fail_mode: str
) -> Iterator[Deployment]:
    """A started deployment with a 1 s timeout; stopped afterwards, with clean logs."""
    yield from running(
        tmp_path_factory.mktemp(f"fail-{fail_mode}-{transport}"),
        transport=transport,
        fail_mode=fail_mode,
        timeout=1,
    )


@pytest.fixture(scope="module", params=["socket", "component"])
def closed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    yield from deployment(tmp_path_factory, request.param, "closed")


@pytest.fixture(params=["socket", "component"])
def fail_open(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    yield from deployment(tmp_path_factory, request.param, "open")


async def both_available(alice: TestClient, bob: TestClient) -> None:
    """Wait until bob's initial presence has been decided and delivered: a message to a bare JID
    reaches only available resources (else it goes to offline storage), and a presence still
    waiting for its decision when the service goes away is refused (fail closed)."""
    alice.send_message(mto="bob@acme.example", mbody="ready?", mtype="chat")
    assert (await next_message(bob, 10))["body"] == "ready?"


async def login_fails(deployment: Deployment, jid: str) -> bool:
    client = TestClient(jid, "pw")
    closed = asyncio.Event()
    client.add_event_handler("disconnected", lambda _: closed.set())
    client.connect("127.0.0.1", deployment.acme.c2s_port)
    await asyncio.wait_for(closed.wait(), 15)
    return not client.ready.is_set()


def test_fail_closed_when_the_service_is_stopped(closed: Deployment) -> None:
    async def scenario() -> None:
        alice, bob = await login(closed, "alice@acme.example", "bob@acme.example")
        await both_available(alice, bob)
        closed.stop_service()  # logged in; now the decision service goes away
        alice.send_message(mto="bob@acme.example", mbody="anyone there?", mtype="chat")
        bounce = await next_message(alice, 10)
        assert bounce["type"] == "error" and error_condition(bounce) == UNAVAILABLE
        assert await nothing_arrives(bob, 1.0)
        assert await login_fails(closed, "new@acme.example")  # fail closed means closed: logins too

        # the service comes back: the same sessions go on, nothing hangs
        await asyncio.to_thread(closed.start_service)
        alice.send_message(mto="bob@acme.example", mbody="back again", mtype="chat")
        assert (await next_message(bob, 10))["body"] == "back again"
        for client in (alice, bob):
            client.disconnect()

    try:
        asyncio.run(scenario())
    finally:
        if closed.service is None:
            closed.start_service()
    log = closed.acme.log_text()
    assert "(decision service" in log and "fail closed, refusing" in log
    assert "no decision for login of new@acme.example/" in log


def test_fail_closed_when_the_service_does_not_answer(closed: Deployment) -> None:
    """The service process is frozen (SIGSTOP): its socket and component connection stay open, but
    no answer comes. Each stanza is refused when its timeout (1 s) passes, and the session lives on."""

    async def scenario() -> None:
        alice, bob = await login(closed, "alice@acme.example", "bob@acme.example")
        await both_available(alice, bob)
        assert closed.service is not None
        closed.service.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            for i in range(3):
                alice.send_message(mto="bob@acme.example", mbody=f"frozen {i}", mtype="chat")
            bounces = [await next_message(alice, 10) for _ in range(3)]
            waited = time.monotonic() - started
            assert all(error_condition(b) == UNAVAILABLE for b in bounces)
            assert 0.9 < waited < 5, waited  # the timeout, not a hang
            assert await nothing_arrives(bob, 0.5)
        finally:
            closed.service.send_signal(signal.SIGCONT)
        # answers to the timed-out requests may still come: they are ignored, never delivered
        alice.send_message(mto="bob@acme.example", mbody="thawed", mtype="chat")
        assert (await next_message(bob, 10))["body"] == "thawed"
        assert await nothing_arrives(bob, 1.0)
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())
    assert "no answer within 1s" in closed.acme.log_text()


def test_fail_open_delivers_when_the_service_is_stopped(fail_open: Deployment) -> None:
    async def scenario() -> None:
        fail_open.stop_service()
        alice, bob = await login(fail_open, "alice@acme.example", "bob@acme.example")  # logins accepted
        alice.send_message(mto="bob@acme.example", mbody="fail open", mtype="chat")
        received = await next_message(bob, 10)
        assert received["body"] == "fail open"
        assert await nothing_arrives(alice, 0.5)  # no bounce
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())
    log = fail_open.acme.log_text()
    assert "fail open, delivering" in log and "fail open, accepting" in log
