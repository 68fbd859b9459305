"""Usage counts from audit logs, for `policyplug report --audit-log` (a Kamailio deployment has no usage store).

Each record's event and decision are rebuilt and counted by `UsageStore.count`, the function the
decision service counts with, so a report from audit logs and one from a usage store cannot differ
in what they count, only in what reached them: an audit log holds only audited decisions.
Logs are read a line at a time (they can be gigabytes); each chain is checked with
`policyplug.audit.verify` first, and a broken chain is a warning, not a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..audit.verify import ROTATION, VerifyResult, expand, verify
from ..decision import DECISIONS, Decision
from ..events import Event
from .store import UsageStore

PROGRESS_EVERY = 100_000  # records between progress lines on stderr
SKIPS_SHOWN = 10  # skipped lines named one by one; the rest are only counted


@dataclass
class AuditReading:
    """What reading the logs gave: records counted, lines skipped, the files in chain order."""

    records: int = 0
    skipped: int = 0
    files: list[Path] = field(default_factory=list)
    other_revision: int = 0  # records decided by another policy revision than the one given

    def heading(self) -> list[str]:
        files = f"{len(self.files)} file" + ("" if len(self.files) == 1 else "s")
        lines = [
            f"from {self.records} audit records in {files}; decisions that were not audited are not counted"
        ]
        if self.skipped:
            lines.append(
                f"{self.skipped} line{'' if self.skipped == 1 else 's'} skipped: not a readable audit record"
            )
        return lines


def chains(paths: list[str]) -> list[list[Path]]:
    """The files named, grouped by chain (a base name and its rotations, as `audit verify` expands
    them), each chain oldest file first; the order given does not matter. Raises FileNotFoundError
    for a path that names no log."""
    # chain (its base file, resolved) -> file (resolved) -> (the path as named, rotation number);
    # resolved so that one file named twice (audit.jsonl and a folder holding it) is counted once
    by_base: dict[Path, dict[Path, tuple[Path, int]]] = {}
    for raw in paths:
        found = expand([raw])
        if not found:
            raise FileNotFoundError(f"no audit log at {raw}")
        for path in found:
            match = ROTATION.search(path.name)
            base = path.with_name(path.name[: match.start()]) if match else path
            by_base.setdefault(base.resolve(), {})[path.resolve()] = (
                path,
                int(match.group(1)) if match else 0,
            )
    # .3 before .2 before .1 before the base: the order the chain was written in
    return [
        [path for path, _ in sorted(files.values(), key=lambda named: -named[1])]
        for _, files in sorted(by_base.items())
    ]


def _verify_chain(files: list[Path]) -> VerifyResult:
    # verify() expands a base name to all its rotations itself; chains() already added them, so
    # passing them too would check them twice (and find the chain "reordered")
    current = [p for p in files if not ROTATION.search(p.name)]
    return verify([str(p) for p in current] if current else [str(p) for p in files])


def _decision(data: Any) -> Decision:
    """The fields of a recorded decision that counting reads, checked, so that a malformed record
    is skipped before it is half counted."""
    if type(data) is not dict:
        raise TypeError("decision is not an object")
    effect, rule, tags = data["decision"], data["rule"], data.get("tags") or None
    if effect not in DECISIONS:
        raise ValueError(f"unknown decision {effect!r}")
    if rule is not None and type(rule) is not str:
        raise TypeError("rule is not a string")
    if tags is not None and (type(tags) is not list or not all(type(t) is str for t in tags)):
        raise TypeError("tags are not a list of strings")
    return Decision(effect, rule, tags=tags)


def count_audit_logs(
    paths: list[str], policy: Any, store: UsageStore, say: Callable[[str], None]
) -> AuditReading:
    """Count every readable record of the logs at `paths` into `store`; warnings and progress go to `say`."""
    reading = AuditReading()
    for files in chains(paths):
        reading.files.extend(files)
        checked = _verify_chain(files)
        if checked.problem:
            say(f"warning: audit log {files[-1]} is not intact, reported all the same: {checked.problem}")
        elif checked.truncated_tail:
            say(f"warning: {checked.truncated_tail}")
        for path in files:
            _count_file(path, policy, store, reading, say)
    if reading.other_revision:
        say(
            f"note: {reading.other_revision} records were decided by another revision than {policy.revision} "
            f"of the policy given; their direction is taken from its local domains"
        )
    return reading


def _count_file(
    path: Path, policy: Any, store: UsageStore, reading: AuditReading, say: Callable[[str], None]
) -> None:
    revision = policy.revision
    with path.open("rb") as lines:  # line by line: a log can be larger than memory
        for number, line in enumerate(lines, start=1):
            try:
                record = orjson.loads(line)
                if "mark" in record and "event" not in record:
                    continue  # what the log says about itself (a seal, a crash repair): no decision
                event_json = record["event"]
                # without its time an event would be counted at the hour the report runs
                if type(event_json) is not dict or "time" not in event_json:
                    raise ValueError("the event has no time")
                event = Event.from_json(event_json)
                decision = _decision(record["decision"])
            except (ValueError, KeyError, TypeError) as exc:
                reading.skipped += 1
                if reading.skipped <= SKIPS_SHOWN:
                    say(f"skipped {path}:{number}: {exc}")
                continue
            store.count(event, decision, policy.activation(event)["direction"])
            if record.get("policy_revision") != revision:
                reading.other_revision += 1
            reading.records += 1
            if reading.records % PROGRESS_EVERY == 0:
                say(f"{reading.records} records read ({path})")
