"""The multi-process audit log (policyplug/audit/shared_file.py), used by Kamailio's forked workers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.audit.shared_file import AuditSpool, SharedAuditLog, SpoolChainer
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
    processes = [context.Process(target=_writer, args=(str(path), w, count, max_bytes)) for w in range(workers)]
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
        f.write(whole[last_line_start + 20:])
    assert chainer.run_once() == 1
    assert verify([str(log)]).records == 3
