"""The component's rules, alone: its backoff and who it answers (the real-Prosody tests are in
tests/integration/test_component_prosody.py)."""

from __future__ import annotations

import random

from slixmpp import JID

from policyplug.service.component import BACKOFF_MAX, _Allowed, backoff_delay, parent_domain


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for failures in range(0, 40):
        ceiling = min(BACKOFF_MAX, 2.0**failures)
        delays = [backoff_delay(failures, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failures
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not one fixed delay
    assert backoff_delay(0, rng) <= 1.0  # after a connection that worked: back within a second


def test_parent_domain() -> None:
    assert parent_domain("policy.acme.example") == "acme.example"
    assert parent_domain("Policy.ACME.example") == "acme.example"
    assert parent_domain("policy") is None


def test_allowed_jids() -> None:
    allowed = _Allowed(["acme.example", "Decider@ACME.example", "ops@acme.example/console"])
    assert JID("acme.example") in allowed
    assert JID("acme.example/anything") in allowed  # the server itself, whatever resource
    assert JID("decider@acme.example/laptop") in allowed  # a bare entry: any resource
    assert JID("ops@acme.example/console") in allowed
    assert JID("ops@acme.example/phone") not in allowed  # a full entry: that resource only
    assert JID("mallory@acme.example/x") not in allowed
    assert JID("acme.example.evil.example") not in allowed
    assert JID("sub.acme.example") not in allowed
    assert not _Allowed([]) and _Allowed([]).describe() == "nobody"
