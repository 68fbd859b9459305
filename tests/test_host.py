"""PolicyHost (policyplug/host.py): what the decision service and the Kamailio adapter share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from policyplug import Event, PolicyError
from policyplug.host import PolicyHost

POLICY = 'policy "h"\nlocal domains ["acme.example"]\ndefault deny "no"\nrule internal:\n  when direction == "internal"\n  allow\n'
WARNED = POLICY + 'rule dlp:\n  when body.matches("[0-9")\n  deny\n'


def touch_later(path: Path, text: str) -> None:
    """Write and move the file's time on, so a change is seen whatever the file system's resolution."""
    before = path.stat().st_mtime if path.exists() else 0.0
    path.write_text(text)
    os.utime(path, (before + 5, before + 5))


class Audit:
    def __init__(self, written: bool | None) -> None:
        self.written = written
        self.records: list[tuple[Any, Any]] = []

    def submit(self, event: Any, decision: Any) -> bool | None:
        self.records.append((event, decision))
        return self.written


class Usage:
    def __init__(self) -> None:
        self.counted: list[tuple[Any, Any, str]] = []

    def count(self, event: Any, decision: Any, direction: str) -> None:
        self.counted.append((event, decision, direction))


def test_install_notes_file_times_and_logs_warnings(tmp_path: Path) -> None:
    path = tmp_path / "h.policy"
    touch_later(path, WARNED)
    warned: list[str] = []
    host = PolicyHost(path, warn=warned.append)
    first = host.load()
    assert host.install(first) is None and host.policy is first
    assert len(warned) == 1 and f"{path}:" in warned[0] and "RE2 rejects this pattern" in warned[0]
    assert not host.changed()
    touch_later(path, POLICY + "rule broken:\n  when nope\n  allow\n")
    assert host.changed()
    with pytest.raises(PolicyError, match="nope"):
        host.load()
    host.mark_seen()  # a text that did not load is not tried again until it changes once more
    assert not host.changed() and host.policy is first
    touch_later(path, POLICY)
    assert host.changed()
    second = host.load()
    assert host.install(second) is first and host.policy is second and not host.changed()
    assert len(warned) == 1  # the second policy has no warnings


def test_record_audits_then_counts_with_the_policy_direction(tmp_path: Path) -> None:
    path = tmp_path / "h.policy"
    touch_later(path, POLICY)
    audit, usage = Audit(written=False), Usage()
    host = PolicyHost(path, warn=print, audit=audit, usage=usage)
    host.install(host.load())
    event = Event.from_json({"kind": "message", "from": "a@acme.example", "to": "b@elsewhere.example"})
    decision = host.policy.decide(event)
    assert decision.decision == "deny"
    assert host.record(event, decision) is False  # the audit log said the record was not written
    assert audit.records == [(event, decision)]
    assert usage.counted == [(event, decision, "outbound")]
    audit.written = None  # the service's log returns nothing: written (it counts its own failures)
    assert host.record(event, decision) is True
    assert PolicyHost(path, warn=print).record(event, decision) is True  # neither log nor store


def test_the_service_records_through_the_host_with_the_answers_encoding(tmp_path: Path) -> None:
    """The decision service records as every host does (PolicyHost.record: audit, then usage), handing
    the audit log the serialisation its answer is made of, and the direction of the policy that decided."""
    import orjson

    from policyplug.audit.log import encode_decision
    from policyplug.service.server import DecisionService

    path = tmp_path / "h.policy"
    touch_later(path, POLICY)

    class EncodedAudit(Audit):
        def submit_encoded(self, event: Any, decision: Any, encoded: tuple[bytes, str, str]) -> None:
            self.records.append((event, encoded))

    audit, usage = EncodedAudit(written=None), Usage()
    service = DecisionService(path, audit=audit, usage=usage)
    recorded: list[tuple[Any, ...]] = []
    real_record = service.record
    service.record = lambda *args: recorded.append(args) or real_record(*args)  # type: ignore[method-assign]
    answer = service.decide_encoded(
        {"kind": "message", "from": "a@acme.example", "to": "b@elsewhere.example"}
    )
    [(event, decision, encoded, policy)] = recorded
    assert policy is service.policy and encoded == encode_decision(decision)
    assert audit.records == [(event, encoded)]  # serialised once, for the answer and the record
    assert usage.counted == [(event, decision, "outbound")]
    body = orjson.loads(answer)
    assert body["decision"] == "deny" and orjson.loads(encoded[0])["decision"] == "deny"
    # without a log or a store there is nothing to record, and no call
    bare = DecisionService(path)
    bare.record = lambda *args: recorded.append(args)  # type: ignore[method-assign]
    bare.decide_encoded({"kind": "message", "from": "a@acme.example", "to": "b@elsewhere.example"})
    assert len(recorded) == 1
