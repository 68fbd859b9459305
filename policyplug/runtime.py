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
PARTY_CACHE_LIMIT = 65536

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
    _parties: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self._candidates:
            self._candidates = {kind: tuple(r for r in self.rules if r.kinds is None or kind in r.kinds)
                                for kind in EVENT_KINDS}

    # -- what conditions see ------------------------------------------------------------------------

    def activation(self, event: Event) -> dict[str, Any]:
        cached = event._activation_cache
        if cached is not None and cached[0] is self:
            return cached[1]
        sender = self._party(event.sender)
        recipient = self._party(event.recipient)
        if sender["local"]:
            direction = "internal" if recipient["local"] else "outbound"
        else:
            direction = "inbound" if recipient["local"] else "transit"
        activation = {
            "kind": event.kind, "protocol": event.protocol, "direction": direction,
            "sender": sender, "recipient": recipient,
            "body": event.body, "subject": event.subject, "type": event.type, "size": event.size,
            "payload": event.payload, "headers": event.headers, "client": event.client, "time": event.time,
        }
        event._activation_cache = (self, activation)
        return activation

    def _party(self, address: Any) -> dict[str, Any]:
        """What conditions see of one address; cached, because the same users talk all day."""
        key = (address.address, address.resource)
        party = self._parties.get(key)
        if party is not None:
            return party
        entry = self.directory.get(address.address)
        party = {
            "address": address.address, "user": address.user, "domain": address.domain,
            "resource": address.resource, "local": address.domain in self.local_domains,
            "groups": entry["groups"] if entry else [], "attrs": entry["attrs"] if entry else {},
        }
        if len(self._parties) >= PARTY_CACHE_LIMIT:
            self._parties.clear()
        self._parties[key] = party
        return party

    # -- deciding -----------------------------------------------------------------------------------

    def decide(self, event: Event, *, now: float | None = None, explain: bool = False,
               limiter: Limiter | None = None) -> Decision:
        """Decide one event. `now` (seconds) drives `limit` windows; by default the event's time."""
        activation = self.activation(event)
        if explain:
            # --explain shows every rule; the index is exact, so the outcome is the same
            candidates: Sequence[CompiledRule] = self.rules
        elif self._selector is not None:
            candidates = self._selector(event, activation)
        else:
            candidates = self._candidates.get(event.kind, ())
        # Lists are created only when needed: most decisions have no errors and few obligations.
        matched_rules: list[CompiledRule] | None = None
        errors: list[dict[str, str]] | None = None
        trace: list[TraceStep] | None = [] if explain else None
        for rule in candidates:
            if explain and rule.kinds is not None and event.kind not in rule.kinds:
                trace.append(TraceStep(rule.name, False, f"on {', '.join(sorted(rule.kinds))}: not a {event.kind}"))
                continue
            error = None  # set when a condition fails with an evaluation error
            for condition in rule.conditions:
                try:
                    value = condition.evaluate(activation)
                except Exception as exc:  # CelEvaluationError; anything else is a bug, still fail safe
                    error = str(exc) if isinstance(exc, CelEvaluationError) \
                        else f"internal error: {type(exc).__name__}: {exc}"
                    break
                if value is not condition.expected:
                    if value is not True and value is not False:
                        error = f"condition '{condition.text}' gave {type(value).__name__}, not a bool"
                    elif explain:
                        clause = "when" if condition.expected else "unless"
                        trace.append(TraceStep(rule.name, False, f"{clause} {condition.text} is {str(value).lower()}"))
                    break
            else:
                # on, when and unless hold: the limit clause, then the rule matches
                if rule.limit is not None:
                    over, error = self._over_limit(rule, activation, event, now, limiter)
                    if not over and error is None:
                        if explain:
                            trace.append(TraceStep(rule.name, False, f"limit {rule.limit.count} per "
                                                                     f"{rule.limit.seconds:g}s by {rule.limit.text} not exceeded"))
                        continue
                if error is None:
                    if explain:
                        trace.append(TraceStep(rule.name, True, "decides" if rule.effect else "matched (obligations added)"))
                    if rule.has_obligations:
                        matched_rules = [rule] if matched_rules is None else matched_rules + [rule]
                    if rule.effect is None:
                        continue
                    return self._decision(rule.effect, rule.name, rule.reason, rule.redirect_to, rule.route_via,
                                          matched_rules, errors, trace)
            if error is None:
                continue
            # An evaluation error: the rule does not match (fail safe), or `on error deny` denies.
            if errors is None:
                errors = []
            errors.append({"rule": rule.name, "message": error})
            if explain:
                trace.append(TraceStep(rule.name, False, f"error: {error}"))
            if self.on_error_deny:
                return self._decision("deny", rule.name, EVALUATION_ERROR_REASON, None, None, matched_rules,
                                      errors, trace, force_audit=True)
        return self._decision(self.default_effect, None, self.default_reason, None, None, matched_rules, errors, trace)

    def _over_limit(self, rule: CompiledRule, activation: dict[str, Any], event: Event, now: float | None,
                    limiter: Limiter | None) -> tuple[bool, str | None]:
        """Count this event against the rule's limit: (over the limit?, evaluation error)."""
        limit = rule.limit
        assert limit is not None
        try:
            key_value = limit.key(activation)
        except Exception as exc:
            return False, f"limit key '{limit.text}': {exc}"
        if isinstance(key_value, dict) and "address" in key_value:
            key_value = key_value["address"]  # `by sender` counts per sender address
        clock = now if now is not None else event.time.timestamp()
        return (limiter or self.limiter).hit(f"{rule.name}\x00{key_value}", clock, limit.seconds, limit.count), None

    def _decision(self, effect: str, rule: str | None, reason: str | None, redirect_to: str | None,
                  route_via: str | None, matched: list[CompiledRule] | None, errors: list[dict[str, str]] | None,
                  trace: list[TraceStep] | None, force_audit: bool = False) -> Decision:
        """Build the decision; obligations of every matched rule, in order, without repeats."""
        copy_to: list[str] = []
        disclaimers: list[str] = []
        tags: list[str] = []
        audit = force_audit
        if matched:
            for m in matched:
                copy_to.extend(a for a in m.copy_to if a not in copy_to)
                disclaimers.extend(d for d in m.disclaimers if d not in disclaimers)
                tags.extend(t for t in m.tags if t not in tags)
                audit = audit or m.audit
        return Decision(effect, rule, reason, redirect_to, route_via, copy_to, disclaimers, tags, audit,
                        errors if errors is not None else [], self.name, self.revision,
                        trace if trace is not None else [])

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
