"""The decision cache of mod_policyplug (socket transport): with a policy that reads only kind and
addresses, a (kind, from, to) decided once is not asked again; after a reload no cached decision
of the old policy is ever served; with a policy that reads more, nothing is cached."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.prosody_deployment import (
    Deployment,
    error_condition,
    login,
    next_message,
    nothing_arrives,
    running,
)
from tests.servers import service_status

ADDRESS_ONLY = """policy "cache-test"
local domains ["acme.example", "rooms.acme.example"]
default deny "not permitted"
{extra}
rule internal:
  when direction == "internal"
  allow
"""
BLOCK_ALICE_TO_BOB = """rule blocked_pair:
  on message
  when sender.address == "alice@acme.example" && recipient.address == "bob@acme.example"
  deny "{reason}"
"""


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[Deployment]:
    policy = tmp_path / "cache.policy"
    policy.write_text(ADDRESS_ONLY.format(extra=""))
    yield from running(tmp_path / "deployment", transport="socket", policy=policy, timeout=10)


def wait_for_log(deployment: Deployment, text: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while deployment.acme.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times"
        time.sleep(0.05)


def reload(deployment: Deployment, policy_text: str, cached: bool = True) -> None:
    """Write the policy, SIGHUP the service, and wait until mod_policyplug has heard of the new
    revision (the service also reloads on file change: whichever comes first)."""
    before = service_status(deployment.socket)["revision"]
    # the module's log so far: a policy text used before (the last reload below goes back to the
    # first one) has the same revision, and its line is in the log already; it must come once more
    log_before = deployment.acme.log_text()
    deployment.policy.write_text(policy_text)
    assert deployment.service is not None
    deployment.service.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while (revision := service_status(deployment.socket)["revision"]) == before:
        assert time.monotonic() < deadline, "the service did not reload"
        time.sleep(0.05)
    heard = f"decision service policy {revision}, " + (
        "decisions cached per (kind, from, to)" if cached else "not cached"
    )
    wait_for_log(deployment, heard, log_before.count(heard) + 1)


def test_cache_is_used_and_never_stale_across_reloads(cached: Deployment) -> None:
    assert service_status(cached.socket)["cacheable"] is True
    wait_for_log(cached, "decisions cached per (kind, from, to)", 1)

    async def scenario() -> None:
        alice, bob = await login(cached, "alice@acme.example", "bob@acme.example")
        alice.send_message(mto="bob@acme.example", mbody="first", mtype="chat")
        assert (await next_message(bob))["body"] == "first"
        asked = sum(service_status(cached.socket)["decisions"].values())
        for i in range(20):
            alice.send_message(mto="bob@acme.example", mbody=f"again {i}", mtype="chat")
        assert [(await next_message(bob))["body"] for _ in range(20)] == [f"again {i}" for i in range(20)]
        # served from the cache: the service was not asked again
        assert sum(service_status(cached.socket)["decisions"].values()) == asked

        # reload (SIGHUP) a policy that blocks exactly that pair: once the module has heard of the
        # reload, the cached allow is gone
        for reason in ("blocked after reload 1", "blocked after reload 2"):
            reload(cached, ADDRESS_ONLY.format(extra=BLOCK_ALICE_TO_BOB.format(reason=reason)))
            for _ in range(3):  # the first answer is cached too: the next ones come from the cache
                alice.send_message(mto="bob@acme.example", mbody="after the reload", mtype="chat")
                bounce = await next_message(alice)
                assert error_condition(bounce) == ("policy-violation", reason)
            assert await nothing_arrives(bob, 0.5)

        # and back to allowing it
        reload(cached, ADDRESS_ONLY.format(extra=""))
        alice.send_message(mto="bob@acme.example", mbody="allowed again", mtype="chat")
        assert (await next_message(bob))["body"] == "allowed again"
        assert await nothing_arrives(alice, 0.5)
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())


def test_nothing_cached_when_the_policy_reads_the_body(cached: Deployment) -> None:
    """A policy reading the body: every stanza is asked about (the same pair gets different answers)."""
    reload(
        cached,
        ADDRESS_ONLY.format(
            extra="""rule words:
  on message
  when body.contains("forbidden")
  deny "no forbidden words"
"""
        ),
        cached=False,
    )
    assert service_status(cached.socket)["cacheable"] is False

    async def scenario() -> None:
        alice, bob = await login(cached, "alice@acme.example", "bob@acme.example")
        for i in range(3):
            alice.send_message(mto="bob@acme.example", mbody=f"fine {i}", mtype="chat")
            assert (await next_message(bob))["body"] == f"fine {i}"
            alice.send_message(mto="bob@acme.example", mbody="forbidden", mtype="chat")
            assert error_condition(await next_message(alice)) == ("policy-violation", "no forbidden words")
        for client in (alice, bob):
            client.disconnect()

    asyncio.run(scenario())
