"""`replay` in several processes gives what one process gives (docs/analysis.md, replay)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from policyplug.analysis import replay as replay_module
from policyplug.analysis.replay import replay
from policyplug.audit.log import AuditWriter
from policyplug.compiler import load_policy
from policyplug.events import Event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_engine import make_events, make_policy  # noqa: E402


def _write_log(folder: Path, count: int, files: int) -> Path:
    """An audit log of `count` records over `files` files (the base and its rotations)."""
    policy = load_policy(text=make_policy(40))
    log = folder / "audit.jsonl"
    per_file = count // files
    events = make_events(40, count)
    for number in range(files):  # rotations hold the older records: .2 before .1 before the base
        path = log if number == files - 1 else folder / f"audit.jsonl.{files - 1 - number}"
        writer = AuditWriter(path, level="all", include_bodies=number % 2 == 0, node="t", background=False)
        for data in events[number * per_file : (number + 1) * per_file]:
            event = Event.from_json(data)
            writer.submit(event, policy.decide(event))
        writer.close()
    with log.open("ab") as out:
        out.write(b"not json\n")
    return log


@pytest.mark.parametrize("jobs", [2, 3, 5])
def test_parallel_replay_is_the_sequential_one(
    tmp_path: Path, jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _write_log(tmp_path, 3000, 3)
    # a proposed policy that changes many decisions, so that samples are picked
    text = make_policy(40).replace('"outbound" && recipient.domain', '"inbound" && recipient.domain')
    proposed = load_policy(text=text)
    one = replay(proposed, [str(log)], jobs=1).to_json()
    assert one["changed"] > 10 and one["skipped"] == 1 and one["without_bodies"] > 0
    monkeypatch.setattr(replay_module, "PARALLEL_MIN_BYTES", 0)
    said: list[str] = []
    many = replay(load_policy(text=text), [str(log)], said.append, jobs=jobs).to_json()
    assert many == one


def test_a_policy_with_limit_is_replayed_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _write_log(tmp_path, 600, 1)
    text = make_policy(40).replace(
        "rule internal:",
        'rule busy:\n  when sender.local\n  limit 3 per hour by sender\n  deny "slow"\n\nrule internal:',
    )
    monkeypatch.setattr(replay_module, "PARALLEL_MIN_BYTES", 0)
    forked = []
    monkeypatch.setattr(replay_module, "_worker", lambda share: forked.append(share))
    result = replay(load_policy(text=text), [str(log)], jobs=2)
    assert not forked and result.hits["busy"] > 0
