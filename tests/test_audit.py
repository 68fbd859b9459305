"""The audit log: chained records, tampering detected, rotation, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from policyplug import Event, load_policy
from policyplug.audit import AuditWriter, verify

POLICY = load_policy(
    text='policy "audit-test"\nlocal domains ["acme.example"]\ndefault deny "no"\n'
    'rule internal:\n  when direction == "internal"\n  allow\n'
    'rule noted:\n  when direction == "inbound"\n  audit\n  allow\n'
)


def write_records(path: Path, count: int, **options) -> AuditWriter:  # type: ignore[no-untyped-def]
    writer = AuditWriter(path, level="all", **options)
    for i in range(count):
        event = Event.message(f"user{i}@acme.example", "x@partner.example", body=f"secret {i}")
        writer.submit(event, POLICY.decide(event))
    writer.close()
    return writer


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_records_carry_the_decision_and_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    writer = write_records(log, 5)
    assert writer.stats["written"] == 5 and writer.stats["errors"] == 0
    assert writer.stats["syncs"] >= 1, "close fsyncs, and status counts it"
    records = [json.loads(line) for line in lines_of(log)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == "0" * 64
    assert all(r["prev"] == p["hash"] for p, r in zip(records, records[1:], strict=False))
    first = records[0]
    assert first["policy"] == "audit-test" and first["policy_revision"].startswith("sha256:")
    assert first["decision"]["decision"] == "deny" and first["decision"]["reason"] == "no"
    assert "body" not in first["event"]  # bodies are left out unless the operator turns them on
    assert len({r["id"] for r in records}) == 5
    result = verify([str(log)])
    assert result.intact and result.records == 5


def test_bodies_only_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 1, include_bodies=True)
    assert json.loads(lines_of(log)[0])["event"]["body"] == "secret 0"


def test_levels(tmp_path: Path) -> None:
    denied = AuditWriter(tmp_path / "d.jsonl")  # default: denied, drops, and `audit` rules
    for sender, recipient in [
        ("a@acme.example", "b@acme.example"),
        ("a@x.example", "b@acme.example"),
        ("a@acme.example", "b@x.example"),
    ]:
        event = Event.message(sender, recipient)
        denied.submit(event, POLICY.decide(event))
    denied.close()
    kinds = [json.loads(line)["decision"]["rule"] for line in lines_of(tmp_path / "d.jsonl")]
    assert kinds == ["noted", None]  # the audited allow, and the default deny; not the internal allow
    # `none`: no decision is written for the level's sake, but a rule's `audit` clause writes its
    # decision "even where the audit level would not" (docs/language.md)
    none = AuditWriter(tmp_path / "n.jsonl", level="none")
    for sender, recipient in [("a@acme.example", "b@x.example"), ("a@acme.example", "b@acme.example")]:
        event = Event.message(sender, recipient)
        none.submit(event, POLICY.decide(event))
    none.close()
    assert not (tmp_path / "n.jsonl").exists()
    none = AuditWriter(tmp_path / "n.jsonl", level="none")
    for sender, recipient in [("a@x.example", "b@acme.example"), ("a@acme.example", "b@x.example")]:
        event = Event.message(sender, recipient)
        none.submit(event, POLICY.decide(event))
    none.close()
    assert [json.loads(line)["decision"]["rule"] for line in lines_of(tmp_path / "n.jsonl")] == ["noted"]


def test_the_services_submit_path_keeps_levels_order_and_counts_drops(tmp_path: Path) -> None:
    """submit_encoded (the decision service's path) queues inline; levels apply as in submit, and a full
    queue counts a drop instead of blocking the decision."""
    from policyplug.audit.log import encode_decision

    denied = AuditWriter(tmp_path / "d.jsonl")
    for sender, recipient in [
        ("a@acme.example", "b@acme.example"),
        ("a@x.example", "b@acme.example"),
        ("a@acme.example", "b@x.example"),
    ]:
        event = Event.message(sender, recipient)
        decision = POLICY.decide(event)
        denied.submit_encoded(event, decision, encode_decision(decision))
    denied.close()
    assert [json.loads(line)["decision"]["rule"] for line in lines_of(tmp_path / "d.jsonl")] == [
        "noted",
        None,
    ]

    full = AuditWriter(tmp_path / "f.jsonl", level="all", queue_size=3)

    def submit(i: int) -> None:
        event = Event.message(f"user{i}@acme.example", "x@partner.example")
        decision = POLICY.decide(event)
        full.submit_encoded(event, decision, encode_decision(decision))

    submit(0)  # starts the writer thread
    with full._lock:  # the writer takes what is queued, then waits here to write it: the queue fills up
        time.sleep(0.05)
        for i in range(1, 11):
            submit(i)
        assert full.stats["dropped"] == 7
    full.close()
    senders = [json.loads(line)["event"]["from"] for line in lines_of(tmp_path / "f.jsonl")]
    assert senders == [f"user{i}@acme.example" for i in range(4)]
    assert verify([str(tmp_path / "f.jsonl")]).intact


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda lines: lines.__setitem__(2, lines[2].replace('"deny"', '"allow"')), "was altered"),
        (lambda lines: lines.__delitem__(3), "removed or reordered"),
        (lambda lines: lines.insert(1, lines.pop(4)), "does not follow"),
        (lambda lines: lines.__delitem__(0), "not the start of the chain"),
        (lambda lines: lines.__setitem__(1, "{garbage"), "not a valid audit record"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "audit.jsonl"
    write_records(log, 6)
    lines = lines_of(log)
    tamper(lines)
    log.write_text("\n".join(lines) + "\n")
    result = verify([str(log)])
    assert not result.intact and message in result.problem
    cli = subprocess.run(
        [sys.executable, "-m", "policyplug", "audit", "verify", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and "TAMPERED" in cli.stderr and str(log) in cli.stderr


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 40, max_bytes=1500, background=False)
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) >= 4
    result = verify([str(log)])  # the base name expands to .N ... .1, then the current file
    assert result.intact and result.records == 40
    assert verify([str(tmp_path)]).records == 40
    # a new writer continues the chain of the existing files
    write_records(log, 3, max_bytes=1500, background=False)
    assert verify([str(log)]).records == 43
    # deleting a whole middle file is noticed, and so is deleting the oldest
    (tmp_path / "audit.jsonl.2").unlink()
    assert "does not follow" in (verify([str(log)]).problem or "")
    oldest = max(tmp_path.glob("audit.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    oldest.unlink()
    assert "not the start of the chain" in (verify([str(log)]).problem or "")


def test_unwritable_log_is_counted_and_decisions_go_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log's folder should be")
    writer = AuditWriter(blocker / "audit.jsonl", level="all", background=False)
    event = Event.message("a@acme.example", "b@x.example")
    writer.submit(event, POLICY.decide(event))  # must not raise
    assert writer.stats["errors"] == 1 and writer.stats["last_error"]
    writer.close()


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        from policyplug import Event, load_policy
        from policyplug.audit import AuditWriter
        policy = load_policy(text='policy "k"\\ndefault deny\\n')
        writer = AuditWriter({str(log)!r}, level="all", flush_interval=0.05)
        i = 0
        while True:
            event = Event.message(f"u{{i}}@a.example", "b@c.example")
            writer.submit(event, policy.decide(event))
            i += 1
            if i == 2000:
                print("ready", flush=True)
            if i % 100 == 0:
                time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    result = verify([str(log)])
    assert result.intact, result.problem
    assert result.records >= 2000


def sample_events() -> list[Event]:
    demo = Path(__file__).resolve().parent.parent / "policyplug" / "demo" / "events"
    events = [Event.from_json(json.loads(p.read_text())) for p in sorted(demo.glob("*.json"))]
    events.append(
        Event.from_json(
            {
                "kind": "message",
                "from": "Zoë@acme.example/phone",
                "to": "x@partner.example",
                "body": "bonjour \u2603",
                "subject": "s",
                "time": "2026-11-24T10:00:00.250001+02:00",
                "headers": {"X-B": "2", "X-A": "1"},
                "payload": ["urn:xmpp:receipts"],
                "client": {"ip": "192.0.2.1", "port": 5222, "secure": True},
            }
        )
    )
    events.append(Event.message("a@acme.example", "b@acme.example"))  # default time: now, with microseconds
    assert len(events) > 3
    return events


@pytest.mark.parametrize("include_bodies", [False, True])
def test_fast_event_encoding_is_the_canonical_event_json(include_bodies: bool) -> None:
    from policyplug.audit.log import canonical, encode_event, event_record

    for event in sample_events():
        assert encode_event(event, include_bodies) == canonical(event_record(event, include_bodies)), event


def test_decision_serialisations_are_remembered_only_for_what_they_say() -> None:
    """encode_decision remembers the bytes of a decision by its shape: every member to_json gives.
    A remembered answer must never stand for a decision that differs in any member."""
    from policyplug import Decision
    from policyplug.audit.log import _ENCODED_DECISIONS, canonical, encode_decision

    def fresh(decision: Decision) -> tuple[bytes, str, str]:
        as_json = decision.to_json()
        return (
            canonical({k: v for k, v in as_json.items() if k not in ("policy", "policy_revision")}),
            as_json["policy"],
            as_json["policy_revision"],
        )

    decisions = [POLICY.decide(event) for event in sample_events()] * 2
    base: dict[str, object] = dict(
        decision="allow",
        rule="r",
        reason=None,
        redirect_to=None,
        route_via=None,
        copy_to=None,
        disclaimers=None,
        tags=None,
        audit=False,
        policy="p",
        policy_revision="1",
    )
    changes = [
        ("decision", "deny"),
        ("rule", None),
        ("reason", "why"),
        ("redirect_to", "x@acme.example"),
        ("route_via", "sip:sbc"),
        ("copy_to", ("c@acme.example",)),
        ("disclaimers", ("d",)),
        ("tags", ("t",)),
        ("tags", ("t", "u")),
        ("audit", True),
        ("policy", "q"),
        ("policy_revision", "2"),
    ]
    variants = [Decision(**base)] + [Decision(**{**base, member: value}) for member, value in changes]
    with_errors = Decision(
        "deny", "r", "why", errors=[{"rule": "r", "message": "boom"}], policy="p", policy_revision="1"
    )
    for decision in decisions + variants + [with_errors, with_errors]:
        assert encode_decision(decision) == fresh(decision), decision
    assert with_errors.shape() is None and any(d.shape() is not None for d in decisions)
    assert 0 < len(_ENCODED_DECISIONS)


@pytest.mark.parametrize("include_bodies", [False, True])
def test_written_records_are_canonical_build_records(tmp_path: Path, include_bodies: bool) -> None:
    """The writer puts records together from serialised parts: byte for byte canonical(build_record())."""
    from policyplug.audit.log import build_record, canonical, record_body, record_hash

    log = tmp_path / "audit.jsonl"
    writer = AuditWriter(log, level="all", node="node-ü", include_bodies=include_bodies, background=False)
    events = sample_events()
    decisions = [POLICY.decide(event) for event in events]
    for event, decision in zip(events, decisions, strict=True):
        writer.submit(event, decision)
    writer.close()
    raw_lines = log.read_bytes().splitlines()
    assert len(raw_lines) == len(events)
    for raw, event, decision in zip(raw_lines, events, decisions, strict=True):
        record = json.loads(raw)
        expected = build_record(
            event,
            decision,
            node="node-ü",
            include_bodies=include_bodies,
            record_id=record["id"],
            time=record["time"],
        )
        expected.update(seq=record["seq"], prev=record["prev"])
        body = canonical(expected)
        assert raw == b'{"hash":"' + record["hash"].encode() + b'",' + body[1:]
        assert record_hash(record) == record["hash"]
        assert (
            record_body(
                decision=canonical(expected["decision"]),
                event=canonical(expected["event"]),
                record_id=record["id"],
                node="node-ü",
                policy=record["policy"],
                revision=record["policy_revision"],
                prev=record["prev"],
                seq=record["seq"],
                time=record["time"],
            )
            == body
        )
        assert ("body" in record["event"]) == include_bodies
    assert verify([str(log)]).intact
