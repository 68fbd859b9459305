"""Decisions: first-match evaluation of a compiled policy over one event.

This module is the hot path. Conditions are already Python callables (policyplug.compiler);
here we only build the activation (what conditions see), walk the candidate rules in file
order and collect obligations. Evaluation never raises on event content: a failing condition
makes its rule not match (or, with `on error deny`, denies), and is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cel.errors import CelEvaluationError
from .decision import Decision, TraceStep
from .events import Event
from .limits import Limiter, MemoryLimiter
from .nodes import EVENT_KINDS

EVALUATION_ERROR_REASON = "policy evaluation error"

Condition = Callable[[dict[str, Any]], Any]


@dataclass(slots=True)
class CompiledCondition:
    evaluate: Condition
    expected: bool  # True for `when`, False for `unless`
    text: str
    fallback: bool = False
    fallback_reason: str | None = None


@dataclass(slots=True)
class CompiledLimit:
    key: Condition
    count: int
    seconds: float
    text: str


@dataclass(slots=True, eq=False)
class CompiledRule:
    name: str
    index: int  # position in the file: first-match order
    kinds: frozenset[str] | None
    conditions: tuple[CompiledCondition, ...]
    limit: CompiledLimit | None
    effect: str | None  # allow | deny | drop | redirect, or None for a non-terminal rule
    reason: str | None = None
    redirect_to: str | None = None
    route_via: str | None = None
    copy_to: tuple[str, ...] = ()
    disclaimers: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    audit: bool = False
    has_obligations: bool = False
    location: Any = None


@dataclass
class Policy:
    """A loaded, compiled policy. Thread-compatible: decide() only reads, except limit counters."""

    name: str
    revision: str
    path: Path | None
    files: list[Path]
    reads: frozenset[str]
    rules: list[CompiledRule]
    default_effect: str
    default_reason: str | None
    on_error_deny: bool
    local_domains: frozenset[str]
    directory: dict[str, dict[str, Any]]
    lists: dict[str, tuple[str, ...]]
    tests: list[Any] = field(default_factory=list)
    limiter: Limiter = field(default_factory=MemoryLimiter)
    model: Any = None
    _candidates: dict[str, Sequence[CompiledRule]] = field(default_factory=dict)
    _selector: Callable[[Event, dict[str, Any]], Sequence[CompiledRule]] | None = None

    def __post_init__(self) -> None:
        if not self._candidates:
            self._candidates = {kind: tuple(r for r in self.rules if r.kinds is None or kind in r.kinds)
                                for kind in EVENT_KINDS}

    # -- what conditions see ------------------------------------------------------------------------

    def activation(self, event: Event) -> dict[str, Any]:
        cached = event._activation_cache
        if cached is not None and cached[0] == id(self):
            return cached[1]
        sender, recipient = event.sender, event.recipient
        local = self.local_domains
        sender_local = sender.domain in local
        recipient_local = recipient.domain in local
        if sender_local:
            direction = "internal" if recipient_local else "outbound"
        else:
            direction = "inbound" if recipient_local else "transit"
        activation = {
            "kind": event.kind, "protocol": event.protocol, "direction": direction,
            "sender": self._party(sender, sender_local), "recipient": self._party(recipient, recipient_local),
            "body": event.body, "subject": event.subject, "type": event.type, "size": event.size,
            "payload": event.payload, "headers": event.headers, "client": event.client, "time": event.time,
        }
        event._activation_cache = (id(self), activation)
        return activation

    def _party(self, address: Any, is_local: bool) -> dict[str, Any]:
        entry = self.directory.get(address.address)
        return {
            "address": address.address, "user": address.user, "domain": address.domain,
            "resource": address.resource, "local": is_local,
            "groups": entry["groups"] if entry else [], "attrs": entry["attrs"] if entry else {},
        }

    # -- deciding -----------------------------------------------------------------------------------

    def decide(self, event: Event, *, now: float | None = None, explain: bool = False,
               limiter: Limiter | None = None) -> Decision:
        """Decide one event. `now` (seconds) drives `limit` windows; by default the event's time."""
        activation = self.activation(event)
        if explain:
            # --explain shows every rule; the index is exact, so the outcome is the same
            candidates = self.rules
        elif self._selector is not None:
            candidates = self._selector(event, activation)
        else:
            candidates = self._candidates.get(event.kind, ())
        copy_to: list[str] = []
        disclaimers: list[str] = []
        tags: list[str] = []
        audit = False
        errors: list[dict[str, str]] = []
        trace: list[TraceStep] = []
        for rule in candidates:
            if explain and rule.kinds is not None and event.kind not in rule.kinds:
                trace.append(TraceStep(rule.name, False, f"on {', '.join(sorted(rule.kinds))}: not a {event.kind}"))
                continue
            matched = True
            failed = False
            why = ""
            for condition in rule.conditions:
                try:
                    value = condition.evaluate(activation)
                except CelEvaluationError as exc:
                    matched = False
                    failed = True
                    errors.append({"rule": rule.name, "message": str(exc)})
                    why = f"error in '{condition.text}': {exc}"
                    break
                except Exception as exc:  # a bug in a compiled condition must not take the server down
                    matched = False
                    failed = True
                    errors.append({"rule": rule.name, "message": f"internal error: {type(exc).__name__}: {exc}"})
                    why = f"internal error in '{condition.text}'"
                    break
                if value is not condition.expected:
                    matched = False
                    if value is not True and value is not False:
                        message = f"condition '{condition.text}' gave {type(value).__name__}, not a bool"
                        errors.append({"rule": rule.name, "message": message})
                        failed = True
                        why = message
                    elif explain:
                        clause = "when" if condition.expected else "unless"
                        why = f"{clause} {condition.text} is {str(value).lower()}"
                    break
            if not matched:
                if failed and self.on_error_deny:
                    if explain:
                        trace.append(TraceStep(rule.name, False, why))
                    return self._finish("deny", rule.name, EVALUATION_ERROR_REASON, None, None, copy_to,
                                        disclaimers, tags, True, errors, trace)
                if explain:
                    trace.append(TraceStep(rule.name, False, why))
                continue
            if rule.limit is not None:
                limit = rule.limit
                try:
                    key_value = limit.key(activation)
                except CelEvaluationError as exc:
                    errors.append({"rule": rule.name, "message": f"limit key: {exc}"})
                    if explain:
                        trace.append(TraceStep(rule.name, False, f"error in limit key '{limit.text}': {exc}"))
                    if self.on_error_deny:
                        return self._finish("deny", rule.name, EVALUATION_ERROR_REASON, None, None, copy_to,
                                            disclaimers, tags, True, errors, trace)
                    continue
                if isinstance(key_value, dict) and "address" in key_value:
                    key_value = key_value["address"]
                clock = now if now is not None else event.time.timestamp()
                over = (limiter or self.limiter).hit(f"{rule.name}\x00{key_value}", clock, limit.seconds, limit.count)
                if not over:
                    if explain:
                        trace.append(TraceStep(rule.name, False, f"limit {limit.count} per {limit.seconds:g}s "
                                                                 f"by {limit.text} not exceeded"))
                    continue
            if rule.has_obligations:
                if rule.copy_to:
                    copy_to.extend(a for a in rule.copy_to if a not in copy_to)
                if rule.disclaimers:
                    disclaimers.extend(d for d in rule.disclaimers if d not in disclaimers)
                if rule.tags:
                    tags.extend(t for t in rule.tags if t not in tags)
                audit = audit or rule.audit
            if explain:
                trace.append(TraceStep(rule.name, True, "decides" if rule.effect else "matched (obligations added)"))
            if rule.effect is not None:
                return self._finish(rule.effect, rule.name, rule.reason, rule.redirect_to, rule.route_via,
                                    copy_to, disclaimers, tags, audit, errors, trace)
        return self._finish(self.default_effect, None, self.default_reason, None, None, copy_to, disclaimers,
                            tags, audit, errors, trace)

    def _finish(self, effect: str, rule: str | None, reason: str | None, redirect_to: str | None,
                route_via: str | None, copy_to: list[str], disclaimers: list[str], tags: list[str], audit: bool,
                errors: list[dict[str, str]], trace: list[TraceStep]) -> Decision:
        return Decision(effect, rule, reason, redirect_to, route_via, copy_to, disclaimers, tags, audit, errors,
                        self.name, self.revision, trace)

    # -- introspection --------------------------------------------------------------------------------

    @property
    def rule_names(self) -> list[str]:
        return [r.name for r in self.rules]

    @property
    def cacheable(self) -> bool:
        """True when a decision depends only on kind and addresses (adapters may cache it per
        (kind, from, to) until the next reload): no limits, no body/time/client reads."""
        address_only = {"kind", "protocol", "direction", "sender", "recipient"}
        return self.reads <= address_only and all(r.limit is None for r in self.rules)

    def fallbacks(self) -> list[tuple[str, str, str | None]]:
        """(rule, condition, why) for every condition run by the reference interpreter."""
        return [(r.name, c.text, c.fallback_reason) for r in self.rules for c in r.conditions if c.fallback]

    def reset_limits(self) -> None:
        if isinstance(self.limiter, MemoryLimiter):
            self.limiter.reset()
