"""The multi-process audit log (policyplug/audit/multiprocess_log/), used by Kamailio's forked workers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.audit.multiprocess_log import AuditSpool, SharedAuditLog, SpoolChainer
from policyplug.audit.verify import verify

POLICY = """\
policy "shared-audit"
local domains ["acme.example"]
default deny "no"

rule internal:
  when direction == "internal"
  allow
"""


def _writer(path: str, worker: int, count: int, max_bytes: int | None) -> None:
    policy = load_policy(text=POLICY)
    audit = SharedAuditLog(path, level="all", node=f"worker-{worker}", max_bytes=max_bytes)
    for i in range(count):
        sender = f"user{worker}@acme.example" if i % 2 else f"user{worker}@evil.example"
        event = Event.message(sender, "bob@acme.example", body=f"m{i}")
        audit.submit(event, policy.decide(event))
    audit.close()


def _run_workers(path: Path, workers: int, count: int, max_bytes: int | None = None) -> None:
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_writer, args=(str(path), w, count, max_bytes)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0


def test_concurrent_workers_write_one_intact_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _run_workers(log, workers=4, count=300)
    result = verify([str(log)])
    assert result.intact, result.problem
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert result.records == len(records) == 1200
    assert [r["seq"] for r in records] == list(range(1, 1201))
    assert {r["node"] for r in records} == {f"worker-{w}" for w in range(4)}
    assert {r["decision"]["decision"] for r in records} == {"allow", "deny"}
    assert all("body" not in r["event"] for r in records)


def test_rotation_by_size_keeps_one_chain_across_workers(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _run_workers(log, workers=3, count=200, max_bytes=40_000)
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert rotated, "nothing rotated"
    result = verify([str(log)])  # the base name expands to every rotation, oldest first
    assert result.intact, result.problem
    assert result.records == 600


def test_a_stale_head_falls_back_to_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    policy = load_policy(text=POLICY)
    first, second = SharedAuditLog(log, level="all"), SharedAuditLog(log, level="all")
    event = Event.message("alice@acme.example", "bob@acme.example")
    first.submit(event, policy.decide(event))
    (tmp_path / "audit.jsonl.lock").write_bytes(b"garbage")  # e.g. a crash between the two writes
    second.submit(event, policy.decide(event))
    first.submit(event, policy.decide(event))
    result = verify([str(log)])
    assert result.intact and result.records == 3


def test_tampering_is_found(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _run_workers(log, workers=2, count=20)
    lines = log.read_text().splitlines()
    lines[7] = lines[7].replace('"node":"worker-', '"node":"w0rker-')
    log.write_text("\n".join(lines) + "\n")
    result = verify([str(log)])
    assert not result.intact and "8" in (result.problem or "")


def test_unwritable_log_is_counted_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    audit = SharedAuditLog(blocker / "audit.jsonl", level="all")
    policy = load_policy(text=POLICY)
    event = Event.message("alice@acme.example", "bob@acme.example")
    assert audit.submit(event, policy.decide(event)) is False
    assert audit.stats["errors"] == 1 and "Error" in audit.stats["last_error"]  # named, with its cause


def test_level_denied_skips_allowed_decisions(tmp_path: Path) -> None:
    audit = SharedAuditLog(tmp_path / "audit.jsonl", level="denied")
    policy = load_policy(text=POLICY)
    allowed = Event.message("alice@acme.example", "bob@acme.example")
    denied = Event.message("eve@evil.example", "bob@acme.example")
    assert audit.submit(allowed, policy.decide(allowed)) is False
    assert audit.submit(denied, policy.decide(denied)) is True
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1


# -- the spool: workers append unchained lines, one chainer moves them into the log ---------------


def _spooler(spool: str, worker: int, count: int) -> None:
    policy = load_policy(text=POLICY)
    audit = AuditSpool(spool, level="all", node=f"worker-{worker}")
    for i in range(count):
        event = Event.message(f"user{worker}@acme.example", "bob@acme.example", body=f"m{i}")
        assert audit.submit(event, policy.decide(event))


def test_spooled_records_from_many_workers_are_chained_in_time_order(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_spooler, args=(str(spool), w, 250)) for w in range(4)]
    for process in workers:
        process.start()
    moved = 0
    while any(p.is_alive() for p in workers):
        moved += chainer.run_once()  # runs while the workers write: partial lines wait
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    moved += chainer.run_once()
    assert moved == 1000
    result = verify([str(log)])
    assert result.intact, result.problem
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({r["id"] for r in records}) == 1000, "every record exactly once"
    for worker in range(4):  # each worker's records keep their order in the chain
        own = [r["time"] for r in records if r["node"] == f"worker-{worker}"]
        assert len(own) == 250 and own == sorted(own)
    assert list(spool.glob("*.jsonl")) == [], "spool files of finished workers are removed"


def test_a_new_chainer_continues_where_the_last_one_stopped(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 10)  # this process stays alive: its spool file stays
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 10
    _spooler(str(spool), 0, 5)
    # a restarted timer process: offsets come from offsets.json, nothing is chained twice
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 5
    result = verify([str(log)])
    assert result.intact and result.records == 15


def test_a_torn_last_line_waits_for_its_end(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 3)
    path = next(spool.glob("*.jsonl"))
    whole = path.read_bytes()
    last_line_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(whole[: last_line_start + 20])  # a worker in the middle of its write
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 2
    with path.open("ab") as f:
        f.write(whole[last_line_start + 20 :])
    assert chainer.run_once() == 1
    assert verify([str(log)]).records == 3


# -- records as bytes: the spool lines are canonical(build_record()) -------------------------------

RICH_POLICY = """\
policy "rich"
local domains ["acme.example"]
default deny "no"

rule tagged:
  when direction == "internal" && body.contains("copy")
  tag "internal"
  disclaimer "Kept."
  audit

rule archived:
  when direction == "internal" && body.contains("copy")
  allow
  copy to "archive@acme.example"

rule internal:
  when direction == "internal"
  allow

rule broken:
  when sender.domain == "err.example" && int(body) > 1
  allow
"""


def _sample_events() -> list[Event]:
    return [
        Event.message("alice@acme.example", "bob@acme.example", body="hi"),
        Event.message("alice@acme.example", "bob@acme.example", body="please copy this ü", subject="s"),
        Event.message("eve@evil.example", "bob@acme.example", body="x"),
        Event.message("z@err.example", "bob@acme.example", body="not a number"),
        Event.from_json(
            {
                "kind": "message",
                "from": "sip:Zoë@acme.example",
                "to": "sip:x@acme.example",
                "body": "b",
                "time": "2026-11-24T10:00:00+02:00",
                "headers": {"X-B": "2", "Via": "v"},
                "payload": ["text/plain"],
                "client": {"ip": "192.0.2.1", "port": 5060, "secure": True},
                "size": 321,
            }
        ),
    ]


def test_encoded_lines_are_byte_for_byte_canonical_build_records() -> None:
    from datetime import UTC, datetime

    from policyplug.audit.log import build_record, canonical
    from policyplug.audit.record import RecordEncoder

    policy = load_policy(text=RICH_POLICY)
    events = _sample_events()
    decisions = [policy.decide(event) for event in events]
    assert {d.decision for d in decisions} == {"allow", "deny"} and any(d.errors for d in decisions)
    assert any(d.copy_to and d.tags and d.disclaimers for d in decisions)
    times = [datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC), datetime.now(UTC)]  # without and with microseconds
    for bodies in (False, True):
        encoder = RecordEncoder("node-ü", bodies)
        for _round in range(2):  # the second time from the decision cache
            for event, decision in zip(events, decisions, strict=True):
                for when in times:
                    expected = canonical(
                        build_record(
                            event,
                            decision,
                            node="node-ü",
                            include_bodies=bodies,
                            record_id="ab" * 16,
                            time=when.isoformat(),
                        )
                    )
                    assert encoder.line(event, decision, record_id="ab" * 16, time=when) == expected
                    head, tail = encoder.parts(event, decision, record_id="ab" * 16, time=when)
                    assert head + tail == expected and tail.startswith(b',"time":')
                    assert (
                        encoder.line(event, decision, record_id="ab" * 16, time=when, end=b"\n")
                        == expected + b"\n"
                    )
        made = json.loads(encoder.line(events[0], decisions[0]))
        assert len(made["id"]) == 32 and int(made["id"], 16) >= 0 and made["time"].endswith("+00:00")


def test_spooled_lines_chain_into_a_log_that_verifies_with_the_records_build_record_makes(
    tmp_path: Path,
) -> None:
    from policyplug.audit.log import build_record, canonical

    policy = load_policy(text=RICH_POLICY)
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    audit = AuditSpool(spool, level="all", node="n1", include_bodies=True)
    events = _sample_events() * 3
    decisions = [policy.decide(event) for event in events]
    for event, decision in zip(events, decisions, strict=True):
        assert audit.submit(event, decision)
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == len(events)
    result = verify([str(log)])
    assert result.intact and result.records == len(events), result.problem
    raw_lines = log.read_bytes().splitlines()
    for raw, event, decision in zip(raw_lines, events, decisions, strict=True):
        record = json.loads(raw)
        expected = build_record(
            event, decision, node="n1", include_bodies=True, record_id=record["id"], time=record["time"]
        )
        expected.update(seq=record["seq"], prev=record["prev"])
        assert raw == b'{"hash":"' + record["hash"].encode() + b'",' + canonical(expected)[1:]
    assert len({json.loads(raw)["id"] for raw in raw_lines}) == len(events)
    import subprocess
    import sys

    cli = subprocess.run(
        [sys.executable, "-m", "policyplug", "audit", "verify", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and f"intact: {len(events)} records" in cli.stdout, cli.stdout + cli.stderr


def test_the_audit_level_is_what_should_audit_says(tmp_path: Path) -> None:
    from policyplug.audit.log import should_audit

    policy = load_policy(text=RICH_POLICY)
    decisions = [policy.decide(event) for event in _sample_events()]
    for level in ("all", "denied", "none"):
        audit = AuditSpool(tmp_path / level, level=level)
        assert [audit.submit(e, d) for e, d in zip(_sample_events(), decisions, strict=True)] == [
            should_audit(level, d) for d in decisions
        ]


def _child_ids(spool: str, count: int) -> None:
    policy = load_policy(text=POLICY)
    event = Event.message("alice@acme.example", "bob@acme.example")
    for _ in range(count):
        assert SPOOL_BEFORE_FORK.submit(event, policy.decide(event))


SPOOL_BEFORE_FORK: AuditSpool


def test_forked_workers_draw_their_own_ids_and_spool_files(tmp_path: Path) -> None:
    """An AuditSpool made (and used) before fork, as in Kamailio's main process: no id is handed out
    twice and each child writes a spool file of its own."""
    global SPOOL_BEFORE_FORK
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    SPOOL_BEFORE_FORK = AuditSpool(spool, level="all", node="n")
    _child_ids(str(spool), 3)  # the parent's id pool and spool file are in use
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_child_ids, args=(str(spool), 50)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(list(spool.glob("*.jsonl"))) == 4
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 153
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert len(set(ids)) == 153


def test_offsets_survive_a_torn_slot(tmp_path: Path) -> None:
    from policyplug.audit.multiprocess_log import OFFSETS_SLOT

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 4)
    first = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert first.run_once() == 4
    _spooler(str(spool), 0, 3)
    assert first.run_once() == 3  # two generations written: one in each slot
    state = (spool / "offsets").read_bytes()
    newer = 0 if state[:OFFSETS_SLOT].split()[1] > state[OFFSETS_SLOT:].split()[1] else 1
    with (spool / "offsets").open("r+b") as f:  # a crash while the newer slot was written
        f.seek(newer * OFFSETS_SLOT + 40)
        f.write(b"torn")
    _spooler(str(spool), 0, 2)
    # the older slot counts: the 3 records chained after it are read again (as after a crash between
    # chaining and saving) and known by their ids at the end of the log: nothing lost, nothing twice
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 2
    assert verify([str(log)]).intact and verify([str(log)]).records == 9


def test_the_offsets_are_written_only_when_they_change(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 2)
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 2
    before = (spool / "offsets").stat().st_mtime_ns, chainer._generation
    assert chainer.run_once() == 0
    assert ((spool / "offsets").stat().st_mtime_ns, chainer._generation) == before


def test_a_line_that_is_not_a_record_is_kept_out_of_the_chain_and_counted(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 2)
    path = next(spool.glob("*.jsonl"))
    with path.open("ab") as f:
        f.write(b'{"garbage": true}\n')
    _spooler(str(spool), 0, 2)
    shared = SharedAuditLog(log, level="all")
    assert SpoolChainer(spool, shared).run_once() == 4, "the records around it are chained"
    assert shared.stats["errors"] == 1 and "not an audit record" in shared.stats["last_error"]
    assert verify([str(log)]).intact


# -- the ring: each worker's spool reused in place (mmap), spool files when it is full -------------


def _ring_spooler(spool: str, worker: int, count: int, ring_bytes: int, pause_every: int = 0) -> None:
    import time

    policy = load_policy(text=POLICY)
    audit = AuditSpool(spool, level="all", node=f"worker-{worker}", ring_bytes=ring_bytes)
    for i in range(count):
        event = Event.message(f"user{worker}@acme.example", "bob@acme.example", body=f"m{i}")
        assert audit.submit(event, policy.decide(event))
        if pause_every and i % pause_every == 0:
            time.sleep(0.001)  # let the chainer catch up now and then: the ring is used again
    assert audit.stats["errors"] == 0


def _chain_while_workers_run(spool: Path, log: Path, workers: list) -> int:
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    for process in workers:
        process.start()
    moved = 0
    while any(p.is_alive() for p in workers):
        moved += chainer.run_once()  # runs while the workers store: frames being written wait
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    return moved + chainer.run_once() + chainer.run_once()


def _check_chain(log: Path, workers: int, each: int) -> None:
    result = verify([str(log)])
    assert result.intact, result.problem
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({r["id"] for r in records}) == len(records) == workers * each, "every record exactly once"
    for worker in range(workers):  # each worker's records keep their order in the chain
        bodies = [r["event"]["size"] for r in records if r["node"] == f"worker-{worker}"]
        times = [r["time"] for r in records if r["node"] == f"worker-{worker}"]
        assert len(bodies) == each and times == sorted(times)


def test_ring_records_of_many_workers_are_chained_in_order_across_laps_and_overflows(tmp_path: Path) -> None:
    from policyplug.audit.multiprocess_log import SpoolRing

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    # 8 KiB rings hold about 12 records: many laps, WRAP frames, and full rings overflowing to files
    workers = [context.Process(target=_ring_spooler, args=(str(spool), w, 400, 8192, 7)) for w in range(4)]
    assert _chain_while_workers_run(spool, log, workers) == 1600
    _check_chain(log, 4, 400)
    assert list(spool.glob("*.ring")) == [] and list(spool.glob("*.jsonl")) == [], (
        "rings and spool files of finished workers are removed"
    )
    # and the ring was used (not only the files): a live writer's ring shows its position
    _ring_spooler(str(spool), 9, 5, 8192)
    ring = SpoolRing.open(next(spool.glob("*.ring")))
    assert ring is not None and len(ring.frames()[0]) == 5
    ring.close()


def test_a_full_ring_overflows_to_the_spool_file_and_is_used_again_once_both_are_chained(
    tmp_path: Path,
) -> None:
    import os

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    policy = load_policy(text=POLICY)
    audit = AuditSpool(spool, level="all", node="worker-0", ring_bytes=4096)
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))

    def submit(count: int) -> None:
        for _ in range(count):
            event = Event.message("user0@acme.example", "bob@acme.example", body="m")
            assert audit.submit(event, policy.decide(event))

    submit(12)  # a 4 KiB ring holds a few of these: the rest go to the spool file
    overflowed = audit.stats["overflowed"]
    assert 0 < overflowed < 12 and (spool / f"{os.getpid()}.jsonl").stat().st_size > 0
    assert chainer.run_once() == 12
    submit(1)  # everything chained: the ring again
    assert audit.stats["overflowed"] == overflowed
    submit(12)
    overflowed = audit.stats["overflowed"]
    assert chainer.run_once() == 13
    assert audit._ring is not None
    audit._ring.set_overflow(0, 0)  # as if the chainer had not said yet that it took the file's records
    submit(1)  # the ring has room, but the spool file's records come first
    assert audit.stats["overflowed"] == overflowed + 1
    assert chainer.run_once() == 1
    submit(1)
    assert audit.stats["overflowed"] == overflowed + 1
    assert chainer.run_once() == 1
    _check_chain(log, 1, 27)


def test_a_torn_or_half_stored_frame_is_not_read_until_complete(tmp_path: Path) -> None:
    import os

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _ring_spooler(str(spool), 0, 3, 8192)
    path = spool / f"{os.getpid()}.ring"
    data = bytearray(path.read_bytes())
    # the third frame: its record bytes changed as if the store had not reached them yet
    from policyplug.audit.multiprocess_log import RING_HEADER, SpoolRing

    ring = SpoolRing.open(path)
    assert ring is not None
    records = ring.frames()[0]
    third = RING_HEADER + sum((16 + len(r) + 7) & ~7 for r in records[:2])
    original = bytes(data[third + 40 : third + 48])
    ring.map[third + 40 : third + 48] = b"\0" * 8
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 2, "the frame being written waits"
    ring.map[third + 40 : third + 48] = original
    assert chainer.run_once() == 1
    ring.close()
    _check_chain(log, 1, 3)


def _stored_then_killed(spool: str, ready: object) -> None:
    import os
    import time

    _ring_spooler(spool, 0, 50, 1 << 20)
    ready.set()  # type: ignore[attr-defined]
    while True:
        time.sleep(1)
    os._exit(0)  # pragma: no cover


def test_a_sigkilled_worker_loses_no_record_it_stored_in_its_ring(tmp_path: Path) -> None:
    import os
    import signal

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_stored_then_killed, args=(str(spool), ready))
    worker.start()
    assert ready.wait(30)
    os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
    worker.join(10)
    assert list(spool.glob("*.jsonl")) == [], "every record went to the ring"
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))  # e.g. at the next start
    assert chainer.run_once() == 50
    assert chainer.run_once() == 0
    assert list(spool.glob("*.ring")) == [], "the dead worker's ring, fully chained, is removed"
    _check_chain(log, 1, 50)


def test_a_ring_reopened_by_the_same_process_goes_on_after_its_last_frame(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _ring_spooler(str(spool), 0, 4, 8192)  # e.g. `kamcmd app_python.reload`: a new AuditSpool, same pid
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 4
    _ring_spooler(str(spool), 0, 30, 8192)
    assert chainer.run_once() + chainer.run_once() == 30
    _check_chain(log, 1, 34)
    # a restarted chainer takes the position from the ring's header: nothing twice
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 0


def test_the_ring_position_survives_a_torn_slot(tmp_path: Path) -> None:
    from policyplug.audit.multiprocess_log import SpoolRing

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _ring_spooler(str(spool), 0, 3, 8192)
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 3
    ring = SpoolRing.open(next(spool.glob("*.ring")))
    assert ring is not None
    generation, chained, _seq = ring.position()  # type: ignore[misc]
    ring.map[16 + (generation % 2) * 32 + 8] ^= 0xFF  # the newest slot torn by a crash
    assert ring.position() is not None and ring.position()[0] == generation - 1  # type: ignore[index]
    ring.close()
    # the older position counts: those 3 are read again (as after a crash between chaining and
    # saving) and known by their ids at the end of the log: nothing lost, nothing twice
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 0
    assert verify([str(log)]).intact and verify([str(log)]).records == 3


def test_a_ring_left_half_made_by_a_dead_worker_is_removed(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    spool.mkdir()
    context = multiprocessing.get_context("fork")
    gone = context.Process(target=lambda: None)
    gone.start()
    gone.join(10)
    (spool / f"{gone.pid}.ring.{gone.pid}.tmp").write_bytes(b"ppring01")  # died while making its ring
    (spool / "1.ring.1.tmp").write_bytes(b"ppring01")  # pid 1 lives: left alone
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 0
    assert sorted(p.name for p in spool.iterdir() if p.name.endswith(".tmp")) == ["1.ring.1.tmp"]


def test_a_ring_frame_that_is_not_a_record_is_kept_out_of_the_chain_and_counted(tmp_path: Path) -> None:
    import os

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _ring_spooler(str(spool), 0, 2, 8192)
    audit = AuditSpool(spool, level="all", node="worker-0", ring_bytes=8192)
    audit.put_line(b'{"garbage":true}')  # a complete frame of this process's ring, not a record
    _ring_spooler(str(spool), 0, 2, 8192)
    assert not (spool / f"{os.getpid()}.jsonl").exists(), "all of them went to the ring"
    shared = SharedAuditLog(log, level="all")
    chainer = SpoolChainer(spool, shared)
    assert chainer.run_once() == 4, "the records around it are chained"
    assert shared.stats["errors"] == 1 and "not an audit record" in shared.stats["last_error"]
    assert chainer.run_once() == 0 and shared.stats["errors"] == 1, (
        "taken once: the ring's position moved past it"
    )
    _check_chain(log, 1, 4)


def test_the_ring_read_keyed_for_the_chainer_gives_the_records_frames_gives(tmp_path: Path) -> None:
    from policyplug.audit.multiprocess_log import SpoolRing

    spool = tmp_path / "spool"
    _ring_spooler(str(spool), 0, 30, 8192)  # several laps of an 8 KiB ring: WRAP frames on the way
    ring = SpoolRing.open(next(spool.glob("*.ring")))
    assert ring is not None
    records, total, seq = ring.frames()
    batch: list = []
    bad: list = []
    assert ring.frames(batch, bad)[1:] == (total, seq) and bad == []
    assert [record for _, record, _ in batch] == records and records
    for key, record, cut in batch:
        assert record[cut : cut + 9] == b',"time":"' and key.startswith(json.loads(record)["time"].encode())
    ring.close()


def test_the_chainer_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    import gc

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _ring_spooler(str(spool), 0, 3, 8192)
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert gc.isenabled()
    assert chainer.run_once() == 3 and gc.isenabled()
    gc.disable()
    try:
        _ring_spooler(str(spool), 0, 1, 8192)
        assert chainer.run_once() == 1 and not gc.isenabled()
    finally:
        gc.enable()
    assert SpoolChainer(tmp_path / "no-such-folder", SharedAuditLog(log, level="all")).run_once() == 0
    assert gc.isenabled()


def test_a_finished_spool_files_offset_goes_when_the_file_does(tmp_path: Path) -> None:
    # A removed file's inode can be given to the next spool file made (a worker starting late): an
    # offset kept for it would skip that file's first records. So it goes in the run that removes it.
    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    worker = context.Process(target=_spooler, args=(str(spool), 0, 5))
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0
    path = next(spool.glob("*.jsonl"))
    inode = str(path.stat().st_ino)
    chainer = SpoolChainer(spool, SharedAuditLog(log, level="all"))
    assert chainer.run_once() == 5
    assert not path.exists(), "chained, its worker gone: removed"
    assert chainer._offsets is not None and inode not in chainer._offsets
    assert inode not in SpoolChainer(spool, SharedAuditLog(log, level="all"))._load_offsets(), (
        "nor in the saved ones"
    )
    _spooler(
        str(spool), 1, 3
    )  # the next spool file (ext4 often gives it the freed inode): read from its start
    assert chainer.run_once() == 3
    result = verify([str(log)])
    assert result.intact and len(log.read_text().splitlines()) == 8


def test_a_chainer_killed_before_saving_its_positions_chains_nothing_twice(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Killed after appending a batch and before saving how far it read (an fsync lies in between):
    at the next start the batch is read again, and its records, already at the end of the log, are
    dropped by their ids. Rings and spool files alike; later records are chained as usual."""
    import pytest

    class Killed(BaseException):
        pass

    spool, log = tmp_path / "spool", tmp_path / "audit.jsonl"
    _spooler(str(spool), 0, 6)  # a spool file (this process stays alive: the file stays)
    _ring_spooler(str(spool / "ring"), 1, 4, 8192)

    def killed(self: SharedAuditLog) -> None:
        raise Killed

    in_log = 0
    for spool_dir, count in ((spool, 6), (spool / "ring", 4)):
        with monkeypatch.context() as patch:
            patch.setattr(SharedAuditLog, "sync", killed)
            with pytest.raises(Killed):
                SpoolChainer(spool_dir, SharedAuditLog(log, level="all")).run_once()
        in_log += count
        assert len(log.read_text().splitlines()) == in_log, "appended, positions not saved"
        assert SpoolChainer(spool_dir, SharedAuditLog(log, level="all")).run_once() == 0, (
            "the batch again: nothing new"
        )
    _spooler(str(spool), 0, 3)
    assert SpoolChainer(spool, SharedAuditLog(log, level="all")).run_once() == 3
    result = verify([str(log)])
    assert result.intact, result.problem
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({r["id"] for r in records}) == len(records) == 13, "every record exactly once"
