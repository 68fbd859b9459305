"""Decisions: first-match evaluation of a compiled policy over one event.

This module is the hot path. Conditions are already Python: each rule's conditions are one
function (policyplug.compiler). A decision looks up what the policy knows of the event's two
parties (cached per address: the party dicts conditions see, and a signature of the values the
rule index cares about), the candidate rules and the direction (cached per event kind and pair
of signatures, policyplug.index), then calls each candidate's function in file order and
collects obligations (shared, cached per sequence of matched rules). No activation dict is built
unless needed: for an evaluation error, a non-bool condition, a `limit`, a condition run by the
reference interpreter or an explained decision, the walk goes on in _walk, condition by
condition. Evaluation never raises on event content: a failing condition
makes its rule not match (or, with `on error deny`, denies), and is recorded.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path
from typing import Any

from .cel.errors import CelEvaluationError
from .compiled import CompiledRule
from .decision import Decision, TraceStep
from .diagnostics import Diagnostic
from .events import Event
from .index import RuleIndex
from .limits import Limiter, MemoryLimiter
from .schema import EVENT_KINDS

EVALUATION_ERROR_REASON = "policy evaluation error"
PARTY_CACHE_LIMIT = 65536


class Obligations:
    """The obligations of the rules matched so far, in order and without repeats. Immutable and
    shared: `then(rule)` is cached, so a decision that matches the usual rules builds nothing."""

    __slots__ = ("copy_to", "disclaimers", "tags", "audit", "_after")

    def __init__(
        self,
        copy_to: tuple[str, ...] = (),
        disclaimers: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        audit: bool = False,
    ):
        self.copy_to = copy_to
        self.disclaimers = disclaimers
        self.tags = tags
        self.audit = audit
        self._after: dict[CompiledRule, Obligations] = {}

    def then(self, rule: CompiledRule) -> Obligations:
        after = self._after.get(rule)
        if after is None:

            def merged(have: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
                out = list(have)
                for item in new:
                    if item not in out:
                        out.append(item)
                return tuple(out)

            after = Obligations(
                merged(self.copy_to, rule.copy_to),
                merged(self.disclaimers, rule.disclaimers),
                merged(self.tags, rule.tags),
                self.audit or rule.audit,
            )
            if len(self._after) < OBLIGATION_CACHE_LIMIT:
                self._after[rule] = after
        return after


OBLIGATION_CACHE_LIMIT = 256
_new_decision = object.__new__
# direction by (sender local, recipient local)
_DIRECTION = {
    (True, True): "internal",
    (True, False): "outbound",
    (False, True): "inbound",
    (False, False): "transit",
}
_SIG_BITS = 40  # sender signature number << _SIG_BITS | recipient signature number: a selection key
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
SELECTION_CACHE_LIMIT = 65536

# A party entry: (party dict, local, sender signature << _SIG_BITS, recipient signature)
PartyEntry = tuple[dict[str, Any], bool, int, int]


@dataclass
class Policy:
    """A loaded, compiled policy. Thread-compatible: decide() only reads, except caches and limit counters."""

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
    _candidates: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)
    _index: RuleIndex | None = None
    # Address.key (address and resource) -> PartyEntry
    _parties: dict[str, PartyEntry] = field(default_factory=dict)
    # A party's signature (its local flag and the values of its indexed fields that some index
    # table holds) -> a number; parties with equal signatures have the same candidate rules.
    _signatures: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # kind -> selection key -> (direction, candidate rules)
    _selection: dict[str, dict[int, tuple[str, tuple[CompiledRule, ...]]]] = field(default_factory=dict)
    _numbers: Iterator[int] = field(default_factory=count)
    _no_obligations: Obligations = field(default_factory=Obligations)
    _default_outcome: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self._candidates:
            self._candidates = {
                kind: tuple(r for r in self.rules if r.kinds is None or kind in r.kinds)
                for kind in EVENT_KINDS
            }
        self._selection = {kind: {} for kind in EVENT_KINDS}
        for rule in self.rules:
            if rule.has_obligations:
                rule.obligations_alone = self._no_obligations.then(rule)
            rule.outcome = (rule.effect, rule.name, rule.reason, rule.redirect_to, rule.route_via)
        self._default_outcome = (self.default_effect, None, self.default_reason, None, None)

    # -- what conditions see ------------------------------------------------------------------------

    def activation(self, event: Event) -> dict[str, Any]:
        """Everything a condition sees of `event` (a dict of plain values), as the reference
        interpreter gets it; decide() itself reads the event and its two parties directly."""
        cached = event._activation_cache
        if cached is None or cached[0] is not self:
            sender, recipient, direction = self._derived(event)
        elif cached[4] is not None:
            return cached[4]
        else:
            sender, recipient, direction = cached[1], cached[2], cached[3]
        activation = {
            "kind": event.kind,
            "protocol": event.protocol,
            "direction": direction,
            "sender": sender[0],
            "recipient": recipient[0],
            "body": event.body,
            "subject": event.subject,
            "type": event.type,
            "size": event.size,
            "payload": event.payload,
            "headers": event.headers,
            "client": event.client,
            "time": event.time,
            "content_complete": event.content_complete,
        }
        event._activation_cache = (self, sender, recipient, direction, activation)
        return activation

    def _derived(self, event: Event) -> tuple[PartyEntry, PartyEntry, str]:
        """(sender entry, recipient entry, direction) of an event, cached on the event."""
        cached = event._activation_cache
        if cached is not None and cached[0] is self:
            return cached[1], cached[2], cached[3]
        s, r = event.sender, event.recipient
        sender = self._parties.get(s.key) or self._party(s)
        recipient = self._parties.get(r.key) or self._party(r)
        direction = _DIRECTION[sender[1], recipient[1]]
        event._activation_cache = (self, sender, recipient, direction, None)
        return sender, recipient, direction

    def _party(self, address: Any) -> PartyEntry:
        """What conditions see of one address, and its signatures; cached, because the same users
        talk all day."""
        entry = self.directory.get(address.address)
        local = address.domain in self.local_domains
        party = {
            "address": address.address,
            "user": address.user,
            "domain": address.domain,
            "resource": address.resource,
            "local": local,
            "groups": entry["groups"] if entry else [],
            "attrs": entry["attrs"] if entry else {},
        }
        if len(self._parties) >= PARTY_CACHE_LIMIT:
            self._forget()
        index = self._index
        if index is not None:
            as_sender = ("sender",) + index.signature(party, "sender")
            as_recipient = ("recipient",) + index.signature(party, "recipient")
        else:
            as_sender, as_recipient = ("sender", local), ("recipient", local)
        result = (party, local, self._number(as_sender) << _SIG_BITS, self._number(as_recipient))
        self._parties[address.key] = result
        return result

    def _number(self, signature: tuple[Any, ...]) -> int:
        number = self._signatures.get(signature)
        if number is None:
            # numbers are never reused, so a cached selection never answers for other parties
            number = self._signatures[signature] = next(self._numbers)
        return number

    def _forget(self) -> None:
        """Drop the party and selection caches (a flood of distinct addresses)."""
        self._parties.clear()
        self._signatures.clear()
        for cache in self._selection.values():
            cache.clear()

    def _select(
        self, kind: str, sender: PartyEntry, recipient: PartyEntry, size_bucket: int | None = None
    ) -> Any:
        """(direction, candidate rules in file order) for an event of `kind` between two parties;
        decide() caches it. Without `size_bucket`: when some candidates have `size` guards, a list
        with a slot per size bucket instead, the last one filled (candidates for any size)."""
        cache = self._selection.get(kind)
        if size_bucket is None and cache is not None and len(cache) >= SELECTION_CACHE_LIMIT:
            cache.clear()
        direction = _DIRECTION[sender[1], recipient[1]]
        index = self._index
        if index is None:
            return direction, self._candidates.get(kind, ())
        candidates = index.candidates(
            kind, direction, sender[0], recipient[0], -1 if size_bucket is None else size_bucket
        )
        if size_bucket is None and index.sizes and any(rule in index.sizes for rule in candidates):
            by_bucket: list[Any] = [None] * (len(index.size_points) + 2)
            by_bucket[-1] = (direction, candidates)
            return by_bucket
        return direction, candidates

    # -- deciding -----------------------------------------------------------------------------------

    def decide(
        self, event: Event, *, now: float | None = None, explain: bool = False, limiter: Limiter | None = None
    ) -> Decision:
        """Decide one event. `now` (seconds) drives `limit` windows; by default the event's time."""
        if explain:
            # --explain shows every rule; the index is exact, so the outcome is the same
            return self._walk(event, iter(self.rules), None, now, True, limiter)
        # The hot path: the event's two parties (cached per address), the candidate rules and the
        # direction (cached per kind and party signatures), each rule's fused matcher. Anything
        # unusual (no matcher, a limit, an evaluation error, a non-bool condition) hands the rest
        # of the walk to _walk, which does it all.
        cached = event._activation_cache
        if cached is not None and cached[0] is self:
            sender, recipient = cached[1], cached[2]
        else:
            parties = self._parties
            sender = parties.get(event.sender.key) or self._party(event.sender)
            recipient = parties.get(event.recipient.key) or self._party(event.recipient)
        kind = event.kind
        key = sender[2] | recipient[3]
        cache = self._selection.get(kind)
        found = cache.get(key) if cache is not None else None
        if found is None:
            found = self._select(kind, sender, recipient)
            if cache is not None:
                cache[key] = found
        if found.__class__ is list:
            # Some candidates have `size` guards: which of them stay depends on the bucket, cut by
            # the bounds of all size guards, that the size falls in (see RuleIndex). The last slot
            # holds them all, for a size that is not an int64 (no size guard is trusted then).
            size = event.size
            if type(size) is int and _INT64_MIN <= size <= _INT64_MAX:
                bucket = bisect_right(self._index.size_points, size)  # type: ignore[union-attr]
            else:
                bucket = -1
            by_bucket = found
            found = by_bucket[bucket]
            if found is None:
                found = by_bucket[bucket] = self._select(kind, sender, recipient, bucket)
        direction, candidates = found
        if cached is None:
            event._activation_cache = (self, sender, recipient, direction, None)
        s_party, r_party = sender[0], recipient[0]
        obligations: Obligations | None = None
        rules = iter(candidates)
        for rule in rules:
            match = rule.match
            limit = rule.limit
            if match is None or (limit is not None and limit.party_key is None):
                return self._walk(event, chain((rule,), rules), obligations, now, False, limiter)
            try:
                result = match(event, s_party, r_party, direction)
            except Exception:  # an evaluation error: _walk evaluates the rule again and reports it
                return self._walk(event, chain((rule,), rules), obligations, now, False, limiter)
            if result is False:
                continue
            if result is not True:
                return self._walk(event, chain((rule,), rules), obligations, now, False, limiter)
            if limit is not None:  # what _over_limit does, with the key read off the party
                party, field = limit.party_key  # type: ignore[misc]
                if not self._count(
                    rule, (s_party if party == "sender" else r_party)[field], event, now, limiter
                ):
                    continue
            if rule.has_obligations:
                obligations = rule.obligations_alone if obligations is None else obligations.then(rule)
            if rule.effect is not None:
                outcome = rule.outcome
                break
        else:
            outcome = self._default_outcome
        # the decision, its slots set here rather than through Decision.__init__ (a call saved)
        decision = _new_decision(Decision)
        decision.decision, decision.rule, decision.reason, decision.redirect_to, decision.route_via = outcome
        if obligations is None:
            decision._copy_to = decision._disclaimers = decision._tags = None
            decision.audit = False
        else:
            decision._copy_to = obligations.copy_to
            decision._disclaimers = obligations.disclaimers
            decision._tags = obligations.tags
            decision.audit = obligations.audit
        decision._errors = decision._trace = None
        decision.policy = self.name
        decision.policy_revision = self.revision
        return decision

    def decide_without(self, event: Event, rule_index: int, *, limiter: Limiter | None = None) -> Decision:
        """Decide `event` as if the rule at `rule_index` were not in the policy (`analyze`'s question
        whether removing a rule changes anything), by the full walk over the other candidate rules."""
        others = (rule for rule in self._candidates[event.kind] if rule.index != rule_index)
        return self._walk(event, others, None, None, False, limiter)

    def _walk(
        self,
        event: Event,
        candidates: Iterator[CompiledRule],
        obligations: Obligations | None,
        now: float | None,
        explain: bool,
        limiter: Limiter | None,
    ) -> Decision:
        """First match over `candidates`, condition by condition, with errors, limits and (explain) a trace."""
        activation = self.activation(event)
        errors: list[dict[str, str]] | None = None
        steps: list[TraceStep] = []  # read only when explaining
        trace = steps if explain else None
        for rule in candidates:
            if explain and rule.kinds is not None and event.kind not in rule.kinds:
                steps.append(
                    TraceStep(rule.name, False, f"on {', '.join(sorted(rule.kinds))}: not a {event.kind}")
                )
                continue
            error = None  # set when a condition fails with an evaluation error
            for condition in rule.conditions:
                try:
                    value = condition.evaluate(activation)
                except Exception as exc:  # CelEvaluationError; anything else is a bug, still fail safe
                    error = (
                        str(exc)
                        if isinstance(exc, CelEvaluationError)
                        else f"internal error: {type(exc).__name__}: {exc}"
                    )
                    break
                if value is not condition.expected:
                    if value is not True and value is not False:
                        error = f"condition '{condition.text}' gave {type(value).__name__}, not a bool"
                    elif explain:
                        clause = "when" if condition.expected else "unless"
                        steps.append(
                            TraceStep(rule.name, False, f"{clause} {condition.text} is {str(value).lower()}")
                        )
                    break
            else:
                # on, when and unless hold: the limit clause, then the rule matches
                if rule.limit is not None:
                    over, error = self._over_limit(rule, activation, event, now, limiter)
                    if not over and error is None:
                        if explain:
                            steps.append(
                                TraceStep(
                                    rule.name,
                                    False,
                                    f"limit {rule.limit.count} per "
                                    f"{rule.limit.seconds:g}s by {rule.limit.text} not exceeded",
                                )
                            )
                        continue
                if error is None:
                    if explain:
                        steps.append(
                            TraceStep(
                                rule.name, True, "decides" if rule.effect else "matched (obligations added)"
                            )
                        )
                    if rule.has_obligations:
                        obligations = (obligations or self._no_obligations).then(rule)
                    if rule.effect is None:
                        continue
                    return self._decision(
                        rule.effect,
                        rule.name,
                        rule.reason,
                        rule.redirect_to,
                        rule.route_via,
                        obligations,
                        errors,
                        trace,
                    )
            if error is None:
                continue
            # An evaluation error: the rule does not match (fail safe), or `on error deny` denies.
            if errors is None:
                errors = []
            errors.append({"rule": rule.name, "message": error})
            if explain:
                steps.append(TraceStep(rule.name, False, f"error: {error}"))
            if self.on_error_deny:
                return self._decision(
                    "deny",
                    rule.name,
                    EVALUATION_ERROR_REASON,
                    None,
                    None,
                    obligations,
                    errors,
                    trace,
                    force_audit=True,
                )
        return self._decision(
            self.default_effect, None, self.default_reason, None, None, obligations, errors, trace
        )

    def _over_limit(
        self,
        rule: CompiledRule,
        activation: dict[str, Any],
        event: Event,
        now: float | None,
        limiter: Limiter | None,
    ) -> tuple[bool, str | None]:
        """Count this event against the rule's limit: (over the limit?, evaluation error)."""
        limit = rule.limit
        assert limit is not None
        try:
            key_value = limit.key(activation)
        except Exception as exc:
            return False, f"limit key '{limit.text}': {exc}"
        if isinstance(key_value, dict) and "address" in key_value:
            key_value = key_value["address"]  # `by sender` counts per sender address
        return self._count(rule, key_value, event, now, limiter), None

    def _count(
        self, rule: CompiledRule, key_value: Any, event: Event, now: float | None, limiter: Limiter | None
    ) -> bool:
        """One hit on the rule's window for `key_value`: over the limit now?"""
        limit = rule.limit
        assert limit is not None
        clock = now if now is not None else event.time.timestamp()
        counter = limiter if limiter is not None else self.limiter
        return counter.hit(f"{rule.name}\x00{key_value}", clock, limit.seconds, limit.count)

    def _decision(
        self,
        effect: str,
        rule: str | None,
        reason: str | None,
        redirect_to: str | None,
        route_via: str | None,
        obligations: Obligations | None,
        errors: list[dict[str, str]] | None,
        trace: list[TraceStep] | None,
        force_audit: bool = False,
    ) -> Decision:
        """Build the decision; obligations of every matched rule, in order, without repeats."""
        o = obligations or self._no_obligations
        return Decision(
            effect,
            rule,
            reason,
            redirect_to,
            route_via,
            list(o.copy_to),
            list(o.disclaimers),
            list(o.tags),
            force_audit or o.audit,
            errors,
            self.name,
            self.revision,
            trace,
        )

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

    @property
    def warnings(self) -> list[Diagnostic]:
        """Diagnostics that did not stop the load (e.g. a constant regex RE2 rejects), each located."""
        return list(self.model.warnings) if self.model is not None else []

    def fallbacks(self) -> list[tuple[str, str, str | None]]:
        """(rule, condition, why) for every condition run by the reference interpreter."""
        return [(r.name, c.text, c.fallback_reason) for r in self.rules for c in r.conditions if c.fallback]

    def reset_limits(self) -> None:
        if isinstance(self.limiter, MemoryLimiter):
            self.limiter.reset()
