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

from collections.abc import Callable
from dataclasses import dataclass, field
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


def replay(policy: Policy, paths: list[str], say: Callable[[str], None] | None = None) -> Replay:
    """Decide every record of the logs at `paths` again. Raises FileNotFoundError/OSError for a
    log that cannot be read; unreadable lines are skipped and counted."""
    result = Replay()
    hits: dict[str | None, int] = {rule.name: 0 for rule in policy.rules}
    hits[None] = 0  # the default: renamed at the end (a rule may not be called None)
    events = changed = skipped = without_bodies = 0
    next_progress = PROGRESS_EVERY
    samples: list[dict[str, Any]] = []
    changes: dict[tuple[Any, Any], int] = {}
    per_pair: dict[tuple[Any, Any], int] = {}
    policy.limiter = MemoryLimiter()
    decide = policy.decide
    from_json = Event.from_json
    loads = orjson.loads
    for files in chains(paths):
        for path in files:
            result.files.append(str(path))
            with path.open("rb") as lines:
                for line in lines:
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
                        if per_pair.get(pair, 0) < SAMPLES_PER_CHANGE and len(samples) < MAX_SAMPLES:
                            per_pair[pair] = per_pair.get(pair, 0) + 1
                            samples.append({"event": event_json, "old": old, "new": new.to_json()})
                    if events >= next_progress:
                        next_progress += PROGRESS_EVERY
                        if say is not None:
                            say(f"{events} events replayed, {changed} changed ({path})")
    result.events, result.changed, result.skipped = events, changed, skipped
    result.without_bodies, result.samples, result.changes = without_bodies, samples, changes
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
