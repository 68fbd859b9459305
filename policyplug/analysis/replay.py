"""`policyplug replay`: recorded events decided again under a proposed policy (docs/analysis.md).

Logs are read as `report --audit-log` reads them (policyplug.usage.audit_source.chains: a base
name and its rotations, oldest first, in chain order), one line at a time. Limit windows count
as they did when recorded: the clock is each event's own time and the records are replayed in
the order they were written (one chain after the other).

Records written without bodies (audit level without `--audit-bodies`) carry no `body` and no
`subject`: they are decided with both empty, and counted in `without_bodies`; a rule that reads
either is named in `body_rules`, since its decisions on such records may differ from the live
ones for that reason alone.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..events import Event, EventError
from ..limits import MemoryLimiter
from ..runtime import Policy
from ..usage.audit_source import chains

PROGRESS_EVERY = 100_000
SAMPLES_PER_CHANGE = 3
MAX_SAMPLES = 100


def _differs(recorded: Any, decided: tuple[str, ...] | None) -> bool:
    """Two obligation lists differ as sets (the usual cases, both empty or equal in order, cost
    one test)."""
    if not recorded:
        return bool(decided)
    if not decided:
        return True
    return tuple(recorded) != decided and set(recorded) != set(decided)


def _changed(old: dict[str, Any], new: Any) -> bool:
    """Reason, redirect, route or obligations (as sets) differ; effect and rule are compared first."""
    get = old.get
    return (
        get("reason") != new.reason
        or get("redirect_to") != new.redirect_to
        or get("route_via") != new.route_via
        or _differs(get("tags"), new._tags)
        or _differs(get("copy_to"), new._copy_to)
        or _differs(get("disclaimers"), new._disclaimers)
    )


@dataclass
class Replay:
    events: int = 0
    changed: int = 0
    skipped: int = 0
    without_bodies: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    never_hit: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    changes: dict[tuple[Any, Any], int] = field(default_factory=dict)  # (old rule, new rule) -> count
    body_rules: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "changed": self.changed,
            "hits": self.hits,
            "never_hit": self.never_hit,
            "samples": self.samples,
            "skipped": self.skipped,
            "without_bodies": self.without_bodies,
            "body_rules": self.body_rules,
            "changes": [{"old_rule": o, "new_rule": n, "count": c} for (o, n), c in self.changes.items()],
        }


Segment = tuple[Path, int, int]  # a file and the byte range [start, end) of whole lines in it
PARALLEL_MIN_BYTES = 16 * 2**20  # smaller logs are replayed in one process (forking costs more)

_policy: Policy | None = None  # the policy a forked worker decides with
_progress: Any = None  # a shared counter of the events workers have replayed


def _lines(segments: list[Segment]) -> Any:
    """(segment number, path, line) for every line of the segments, in order."""
    for number, (path, start, end) in enumerate(segments):
        with path.open("rb") as lines:
            lines.seek(start)
            at = start
            for line in lines:
                if at >= end:
                    break
                at += len(line)
                yield number, path, line


def _run(
    policy: Policy, segments: list[Segment], say: Callable[[int, int, Path], None] | None, base: int = 0
) -> dict[str, Any]:
    """Replay the lines of `segments` (sample positions numbered from segment `base`): counts,
    hits (None: the default), changes per (old rule, new rule), and the first SAMPLES_PER_CHANGE
    samples of each pair with their positions (the total cap is applied when parts are merged)."""
    hits: dict[str | None, int] = {rule.name: 0 for rule in policy.rules}
    hits[None] = 0
    events = changed = skipped = without_bodies = 0
    next_progress = PROGRESS_EVERY
    samples: list[tuple[tuple[int, int], dict[str, Any]]] = []
    changes: dict[tuple[Any, Any], int] = {}
    per_pair: dict[tuple[Any, Any], int] = {}
    decide = policy.decide
    from_json = Event.from_json
    loads = orjson.loads
    for number, path, line in _lines(segments):
        try:
            record = loads(line)
            event_json = record["event"]
            old = record["decision"]
            if type(event_json) is not dict or type(old) is not dict:
                raise ValueError("not an audit record")
            event = from_json(event_json)
        except (ValueError, KeyError, TypeError, EventError):
            skipped += 1
            continue
        if "body" not in event_json:
            without_bodies += 1
        new = decide(event)
        name = new.rule
        hits[name] += 1  # None: the default
        events += 1
        if old.get("rule") != name or old.get("decision") != new.decision or _changed(old, new):
            changed += 1
            pair = (old.get("rule"), name)
            changes[pair] = changes.get(pair, 0) + 1
            if per_pair.get(pair, 0) < SAMPLES_PER_CHANGE:
                per_pair[pair] = per_pair.get(pair, 0) + 1
                sample = {"event": event_json, "old": old, "new": new.to_json()}
                samples.append(((base + number, events + skipped), sample))
        if events >= next_progress:
            next_progress += PROGRESS_EVERY
            if say is not None:
                say(events, changed, path)
    return {
        "events": events,
        "changed": changed,
        "skipped": skipped,
        "without_bodies": without_bodies,
        "hits": hits,
        "changes": changes,
        "samples": samples,
    }


def _worker(share: tuple[int, list[Segment]]) -> dict[str, Any]:
    assert _policy is not None
    counter = _progress

    def say(events: int, changed: int, path: Path) -> None:
        with counter.get_lock():
            counter.value += PROGRESS_EVERY

    return _run(_policy, share[1], say if counter is not None else None, share[0])


def _shares(files: list[Path], jobs: int) -> list[tuple[int, list[Segment]]]:
    """The files cut into `jobs` runs of whole lines of about equal size, in order: (number of
    the first segment, segments)."""
    sizes = [path.stat().st_size for path in files]
    total = sum(sizes)
    cuts = [total * k // jobs for k in range(1, jobs)]  # global offsets, moved to a line start
    bounds: list[tuple[int, int]] = []  # (file number, offset) of each cut
    for cut in cuts:
        before = 0
        for number, size in enumerate(sizes):
            if cut < before + size:
                with files[number].open("rb") as handle:
                    handle.seek(cut - before)
                    if cut - before:
                        handle.seek(cut - before - 1)
                        handle.readline()  # to the start of the next line
                    bounds.append((number, handle.tell()))
                break
            before += size
    points = [(0, 0), *bounds, (len(files), 0)]
    shares: list[tuple[int, list[Segment]]] = []
    first = 0
    for (f0, o0), (f1, o1) in zip(points, points[1:], strict=False):
        segments: list[Segment] = []
        for number in range(f0, min(f1, len(files) - 1) + 1):
            start = o0 if number == f0 else 0
            end = o1 if number == f1 else sizes[number]
            if end > start:
                segments.append((files[number], start, end))
        shares.append((first, segments))
        first += len(segments)
    return shares


def replay(
    policy: Policy, paths: list[str], say: Callable[[str], None] | None = None, jobs: int | None = None
) -> Replay:
    """Decide every record of the logs at `paths` again. Raises FileNotFoundError/OSError for a
    log that cannot be read; unreadable lines are skipped and counted.

    A policy without `limit` decides each event on its own, so a large log is cut into `jobs`
    runs of lines (default: the CPUs this process may use) replayed by forked processes, and
    the parts merged: the same counts, and the same samples (the first of each change, in log
    order). A policy with `limit` is replayed in one process, in order."""
    global _policy, _progress
    result = Replay()
    files = [path for chain in chains(paths) for path in chain]
    result.files = [str(path) for path in files]
    for path in files:  # every log readable before any work (an error names it)
        with path.open("rb"):
            pass
    policy.limiter = MemoryLimiter()
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, jobs)
    if any(rule.limit is not None for rule in policy.rules) or not hasattr(os, "fork"):
        jobs = 1
    if jobs > 1 and sum(path.stat().st_size for path in files) < PARALLEL_MIN_BYTES:
        jobs = 1
    if jobs <= 1:

        def progress(events: int, changed: int, path: Path) -> None:
            if say is not None:
                say(f"{events} events replayed, {changed} changed ({path})")

        parts = [_run(policy, [(path, 0, path.stat().st_size) for path in files], progress)]
    else:
        context = multiprocessing.get_context("fork")
        _policy, _progress = policy, context.Value("q", 0)
        try:
            with context.Pool(jobs) as pool:
                pending = pool.map_async(_worker, _shares(files, jobs))
                shown = 0
                while not pending.ready():
                    pending.wait(0.5)
                    done = _progress.value
                    if say is not None and done > shown:
                        shown = done
                        say(f"{done} events replayed ({jobs} processes)")
                parts = pending.get()
        finally:
            _policy = _progress = None
    hits: dict[str | None, int] = {rule.name: 0 for rule in policy.rules}
    hits[None] = 0
    candidates: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for part in parts:
        result.events += part["events"]
        result.changed += part["changed"]
        result.skipped += part["skipped"]
        result.without_bodies += part["without_bodies"]
        for name, count in part["hits"].items():
            hits[name] += count
        for pair, count in part["changes"].items():
            result.changes[pair] = result.changes.get(pair, 0) + count
        candidates += part["samples"]
    per_pair: dict[tuple[Any, Any], int] = {}
    for _, sample in sorted(candidates, key=lambda item: item[0]):
        pair = (sample["old"].get("rule"), sample["new"]["rule"])
        if per_pair.get(pair, 0) < SAMPLES_PER_CHANGE and len(result.samples) < MAX_SAMPLES:
            per_pair[pair] = per_pair.get(pair, 0) + 1
            result.samples.append(sample)
    hits["default"] = hits.pop(None)
    result.hits = hits  # type: ignore[assignment]
    result.never_hit = [rule.name for rule in policy.rules if hits[rule.name] == 0]
    reads = policy.model.reads if policy.model is not None else frozenset()
    if result.without_bodies and ({"body", "subject"} & set(reads)):
        result.body_rules = [
            r.name
            for r, c in zip(policy.rules, policy.model.rules, strict=True)  # type: ignore[union-attr]
            if _reads_text(c)
        ]
    return result


def _reads_text(checked: Any) -> bool:
    from .symbolic import free_reads

    return any({"body", "subject"} & free_reads(t, frozenset()) for t in [*checked.when, *checked.unless])
