"""`policyplug analyze`: rules that can never decide or change anything (docs/analysis.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import lark
import z3

from ..addresses import AddressError, normalise_domain, parse_address
from ..events import Event, EventError
from ..limits import MemoryLimiter
from ..runtime import Policy
from .candidates import candidates
from .guards import disjoint, guards
from .semantics import PolicyFormula, RuleFormula, Tables
from .symbolic import SymEvent
from .witness import AnalysisBug, decide, event_json, outcome_only, public_event, without_rule

SOLVER_TIMEOUT_MS = 20_000


@dataclass
class Finding:
    kind: str  # shadowed | unsatisfiable | redundant | unknown
    rule: str
    line: int
    by: list[str] | None = None
    reason: str | None = None
    witness: dict[str, Any] | None = None
    file: str = ""  # the file the rule is in (an included file's own name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "rule": self.rule, "line": self.line}
        if self.kind == "shadowed":
            out["by"] = list(self.by or [])
        if self.reason is not None:
            out["reason"] = self.reason
        out["witness"] = self.witness
        return out


@dataclass
class Analysis:
    policy: str
    findings: list[Finding]
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # rule -> witness event it decides/matches

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "findings": [f.to_json() for f in self.findings]}

    @property
    def claims(self) -> list[Finding]:
        """Findings that are claims (all but `unknown`)."""
        return [f for f in self.findings if f.kind != "unknown"]


@dataclass
class Reach:
    """The answer of Analyzer._reach: `model` an event of the walk up to the rule (sat), `upto` the
    formulas asked besides the trigger, `asked` the earlier rules asked about, `alone` the answer
    for the trigger with the rule's own definitions only and `first` its model (None: not asked)."""

    result: z3.CheckSatResult
    model: z3.ModelRef | None = None
    upto: list[Any] = field(default_factory=list)
    asked: list[RuleFormula] = field(default_factory=list)
    alone: z3.CheckSatResult | None = None
    first: z3.ModelRef | None = None


class Session:
    """Checks formulas over the symbolic event, each in a fresh solver with everything asserted
    (z3 answers such queries far faster than the same under assumptions)."""

    def __init__(self, ev: SymEvent, timeout_ms: int = SOLVER_TIMEOUT_MS):
        self.ev = ev
        self.timeout_ms = timeout_ms
        self.checks = 0
        self.last_reason = ""

    def check(self, formulas: list[Any]) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
        self.checks += 1
        solver = z3.Solver()
        solver.set("timeout", self.timeout_ms)
        solver.add(self.ev.core_conjunction())
        solver.add(*formulas)
        return self.finish(solver)

    def finish(
        self, solver: z3.Solver, assumptions: Sequence[Any] = ()
    ) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
        """Check `solver` (asserted without SymEvent's exclusions): unsat is then proven (fewer
        constraints, more events); a model that breaks exclusions gets them added and the
        question asked again, so a model returned satisfies every constraint."""
        while True:
            result = solver.check(*assumptions)
            if result == z3.unknown:
                self.last_reason = solver.reason_unknown()
            if result != z3.sat:
                return result, None
            model = solver.model()
            broken = self.ev.violated_exclusions(model)
            if not broken:
                return result, model
            solver.add(*broken)

    def solve(
        self, formulas: list[Any], preferred: Sequence[Any] = ()
    ) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
        """The answer for `formulas`, with `preferred` (e.g. fresh limit windows) if they fit; an
        unsat answer is always the one without them."""
        if preferred:
            result, model = self.check([*formulas, *preferred])
            if result == z3.sat:
                return result, model
        return self.check(list(formulas))

    def models(self, formulas: list[Any], preferred: Sequence[Any] = ()) -> Iterator[z3.ModelRef]:
        """Models of `formulas` for witnesses: the plain values of SymEvent.nice_groups taken
        group by group where they fit (z3's optimiser with soft constraints is far slower)."""
        result, model = self.solve(list(formulas), preferred)
        if model is None:
            return
        yield model
        accepted = list(formulas)
        best = None
        for group in [list(preferred), *self.ev.nice_groups]:
            if not group:
                continue
            result, model = self.check([*accepted, *group])
            if model is not None:
                accepted += group
                best = model
        if best is not None:
            yield best
        result, model = self.check(list(formulas))
        if model is not None:
            yield model


def _has_items(decision: Any, items: tuple[Any, ...]) -> bool:
    """Whether the decision carries every obligation in `items` (True for none)."""
    held = {
        "copy_to": decision.copy_to,
        "disclaimer": decision.disclaimers,
        "tag": decision.tags,
    }
    return all(decision.audit if kind == "audit" else value in held[kind] for kind, value in items)


def _literals(tree: Any) -> list[str]:
    out = []
    if isinstance(tree, lark.Tree):
        for child in tree.children:
            if isinstance(child, lark.Token) and child.type == "STRING_LIT":
                text = str(child)
                if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and "\\" not in text:
                    out.append(text[1:-1])
            else:
                out.extend(_literals(child))
    return out


_ADDRESSY = re.compile(r"^[^\s]+[.@][^\s]+\Z")


def normalisation_notes(checked: Any) -> list[str]:
    """Literals in a rule's conditions that look like addresses or domains but are not in the
    normal form events carry (docs/addresses.md): such a literal never equals a party's field."""
    notes = []
    for tree in list(checked.when) + list(checked.unless):
        for text in _literals(tree):
            if not _ADDRESSY.match(text):
                continue
            try:
                normal = parse_address(text).address if "@" in text else normalise_domain(text)
            except AddressError as exc:
                notes.append(
                    f'"{text}" is not a valid address or domain ({exc}): no normalised address equals it'
                )
                continue
            if normal != text:
                notes.append(
                    f'"{text}" is not in normal form (events carry "{normal}"): no normalised address '
                    f"or domain equals it"
                )
    return list(dict.fromkeys(notes))


class Analyzer:
    def __init__(self, policy: Policy, *, witnesses: bool = True, timeout_ms: int = SOLVER_TIMEOUT_MS):
        self.policy = policy
        self.ev = SymEvent()
        self.tables = Tables()
        self.formula = PolicyFormula(policy, self.ev, "", self.tables)
        self.session = Session(self.ev, timeout_ms)
        self.witnesses = witnesses
        self.dead: set[str] = set()
        self.guards = [
            guards(compiled.kinds, list(checked.when), dict(policy.lists))
            for compiled, checked in zip(policy.rules, policy.model.rules, strict=True)
        ]  # type: ignore[union-attr]

    def run(self) -> Analysis:
        findings: list[Finding] = []
        live: dict[str, dict[str, Any]] = {}
        checked_rules = self.policy.model.rules  # type: ignore[union-attr]
        for rule, checked in zip(self.formula.rules, checked_rules, strict=True):
            finding, witness = self.rule(rule, checked)
            if finding is not None:
                finding.file = rule.file
                findings.append(finding)
                if finding.kind in ("shadowed", "unsatisfiable"):
                    self.dead.add(rule.name)
            if witness is not None:
                live[rule.name] = witness
        return Analysis(self.policy.name, findings, live)

    def _exact_up_to(self, rule: RuleFormula) -> bool:
        return all(not r.reasons and r.limit is None for r in self.formula.rules[: rule.index + 1])

    def _gave_up(self, rule: RuleFormula) -> Finding:
        return Finding(
            "unknown", rule.name, rule.line, reason=f"the solver gave up ({self.session.last_reason})"
        )

    def rule(self, rule: RuleFormula, checked: Any) -> tuple[Finding | None, dict[str, Any] | None]:
        s = self.session
        oed = self.formula.oed
        guessed = self._guessed_witness(rule, checked)
        if guessed is not None:  # live: the engine decides an event by it
            if self._changes_without(rule, guessed) or not self._redundant(rule):
                return None, guessed
            return Finding("redundant", rule.name, rule.line), None
        fresh = self._fresh(rule)
        # Reached and matching: a model is an event whose walk up to this rule can be read off it.
        match = self._reach(rule, rule.m, fresh)
        reached, model, upto = match.result, match.model, match.upto
        if reached == z3.unknown:
            return self._gave_up(rule), None
        if reached == z3.unsat:
            err = self._reach(rule, rule.e, ()) if oed else Reach(z3.unsat, alone=z3.unsat)
            if err.result == z3.unknown:
                return self._gave_up(rule), None
            if err.result == z3.unsat:
                by_m, by_e = match.asked, err.asked
                can_match = match.alone if match.alone is not None else s.solve([rule.m, *rule.defs])[0]
                can_err = err.alone if err.alone is not None else s.solve([rule.e, *rule.defs])[0]
                if z3.unknown in (can_match, can_err):
                    return self._gave_up(rule), None
                if can_match == z3.unsat and can_err == z3.unsat:
                    notes = normalisation_notes(checked)
                    reason = "; ".join(notes) if notes else "no event satisfies its on/when/unless"
                    return Finding("unsatisfiable", rule.name, rule.line, reason=reason), None
                by = self._covering(rule, [(t, b) for t, b in ((rule.m, by_m), (rule.e, by_e)) if b])
                witness = self._shadow_witness(rule, by, match.first) if self.witnesses else None
                return Finding("shadowed", rule.name, rule.line, by=by, witness=witness), None
        witness = self._live_witness(rule, model, upto, fresh) if model is not None else None
        # Not redundant when the engine itself decides the witness otherwise without the rule;
        # else the solver says whether any event changes.
        if witness is None or outcome_only(decide(self.policy, witness).decision) == outcome_only(
            decide(without_rule(self.policy, rule.index), witness).decision
        ):
            if self._redundant(rule):
                return Finding("redundant", rule.name, rule.line), None
        if model is None:  # it decides only by raising (on error deny): no match to show
            return (
                Finding("unknown", rule.name, rule.line, reason="; ".join(rule.reasons))
                if rule.reasons
                else None
            ), None
        if witness is None:
            reason = (
                "; ".join(rule.reasons)
                if rule.reasons
                else "no event could be built that the engine decides by it"
            )
            return Finding("unknown", rule.name, rule.line, reason=reason), None
        return None, witness

    def _redundant(self, rule: RuleFormula) -> bool:
        """Proven: no event changes effect, reason, redirect, route or obligations without the rule."""
        members = [
            r.index
            for r in self.formula.rules
            if r is rule or not disjoint(self.guards[rule.index], self.guards[r.index])
        ]
        result, _ = self.session.solve(self.formula.removal_changes_within(rule.index, members))
        return result == z3.unsat

    def _guessed_witness(self, rule: RuleFormula, checked: Any) -> dict[str, Any] | None:
        """An event built from the rule's own literals (policyplug.analysis.candidates) that the
        engine decides by the rule (terminal) or whose obligations it adds; None if no guess is."""
        compiled = self.policy.rules[rule.index]
        repeat = rule.limit.count + 1 if rule.limit is not None else 1
        for data in candidates(
            compiled, checked, self.guards[rule.index], self.policy.local_domains, self.policy.directory
        ):
            try:
                quick = self.policy.decide(Event.from_json(data), limiter=MemoryLimiter())
            except (EventError, ValueError):
                continue
            if rule.terminal and repeat == 1:
                if quick.rule == rule.name and not quick.errors:  # decided by it, not by an error
                    return public_event(data)
                if quick.rule != rule.name:
                    continue
            elif not rule.terminal and repeat == 1 and not _has_items(quick, rule.items):
                continue  # had it matched, the decision would carry its obligations
            decided = decide(self.policy, data, repeat)
            if rule.name in decided.matched and (not rule.terminal or decided.decision.rule == rule.name):
                return public_event(data)
        return None

    def _changes_without(self, rule: RuleFormula, data: dict[str, Any]) -> bool:
        """Whether the engine decides `data` otherwise (all but the deciding rule's name) without
        the rule: the engine's own full walk over the other rules for the event's kind
        (Policy.decide_without), instead of a policy rebuilt without it (witness.without_rule,
        whose set-up costs milliseconds in a policy of thousands of rules)."""
        policy = self.policy
        without = policy.decide_without(Event.from_json(data), rule.index, limiter=MemoryLimiter())
        with_it = policy.decide(Event.from_json(data), limiter=MemoryLimiter())
        return outcome_only(with_it) != outcome_only(without)

    def _first_stop(self, model: z3.ModelRef) -> int | None:
        """The rule the walk stops at for the model's event (by the formulas), None if z3 cannot
        evaluate it to a number."""
        value = model.eval(self.formula.first_stop, model_completion=True)
        return value.as_long() if z3.is_int_value(value) else None

    def _reach(self, rule: RuleFormula, trigger: Any, fresh: Sequence[Any]) -> Reach:
        """Is there an event for which `trigger` (the rule's match, or its error) holds and no
        earlier rule stops the walk?

        Asked lazily: first of the rule alone; while the solver's event is stopped by an earlier
        rule (the formulas, evaluated in the model, say which one stops it first), that rule is
        added as "does not stop", and the question asked again. Sat with no earlier stop: the model
        is one of the whole walk up to the rule. Unsat: the rules added already stop every such
        event (a subset of the constraints being unsatisfiable, so is the whole). Each rule is
        added at most once, so this ends; usually after a few small questions instead of one with
        every earlier rule in it (docs/analysis.md, Cost)."""
        added: list[RuleFormula] = []
        alone: z3.CheckSatResult | None = None
        first: z3.ModelRef | None = None
        while True:
            upto = [*rule.defs, *(x for r in added for x in (r.not_s, *r.defs))]
            result, model = self.session.solve([trigger, *upto], fresh)
            if not added:
                alone, first = result, model
            if result != z3.sat or model is None:
                return Reach(result, None, upto, added, alone, first)
            stop = self._first_stop(model)
            if stop is not None and stop >= rule.index:
                return Reach(result, model, upto, added, alone, first)
            if stop is None or self.formula.rules[stop] in added:
                # z3 could not evaluate it: one question with every earlier rule it may meet
                found = self._reach_all(rule, trigger, fresh)
                found.alone, found.first = alone, first
                return found
            added.append(self.formula.rules[stop])

    def _reach_all(self, rule: RuleFormula, trigger: Any, fresh: Sequence[Any]) -> Reach:
        """_reach in one question, with every earlier rule whose guards it can meet."""
        relevant = [
            r
            for r in self.formula.rules[: rule.index]
            if not disjoint(self.guards[rule.index], self.guards[r.index])
        ]
        upto = [z3.And(*[z3.Not(r.s) for r in relevant], *[d for r in [*relevant, rule] for d in r.defs])]
        result, model = self.session.solve([trigger, *upto], fresh)
        asked = [r for r in relevant if (r.terminal or self.formula.oed) and r.name not in self.dead]
        return Reach(result, model, upto, asked)

    def _covering(self, rule: RuleFormula, triggers: list[tuple[Any, list[RuleFormula]]]) -> list[str]:
        """The earlier rules that catch every event this rule would match (or raise for): an
        unsat core (z3 minimises it) of "none of the rules _reach asked about stops it". Those
        rules each stop some event first, so each decides something (rules found never to decide
        are left out of the question: the first rule that stops an event decides it)."""
        names: set[int] = set()
        for trigger, asked in triggers:
            solver = z3.Solver()
            solver.set("timeout", self.session.timeout_ms)
            solver.set("core.minimize", True)
            solver.add(self.ev.core_conjunction(), trigger, *rule.defs)
            flags = {}
            for r in asked:
                flag = z3.Bool(f"passes {r.name}")
                solver.add(flag == r.not_s, *r.defs)
                flags[str(flag)] = r.index
            if self.session.finish(solver, [z3.Bool(f) for f in flags])[0] == z3.unsat:
                names |= {flags[str(lit)] for lit in solver.unsat_core() if str(lit) in flags}
            else:  # the solver could not say under assumptions: every rule asked about
                names |= {r.index for r in asked}
        return [r.name for r in self.formula.rules[: rule.index] if r.index in names]

    def _fresh(self, rule: RuleFormula) -> list[Any]:
        return [z3.Not(r.over) for r in self.formula.rules if r.over is not None and r is not rule]

    def _live_witness(
        self, rule: RuleFormula, first: z3.ModelRef, upto: list[Any], fresh: list[Any]
    ) -> dict[str, Any] | None:
        """An event the engine decides by this rule (terminal) or whose obligations it adds."""
        exact = self._exact_up_to(rule)
        candidates = [first] if first is not None else []
        for model in chain(candidates, self.session.models([rule.m, *upto], fresh)):
            data, repaired = event_json(model, self.ev, repair=True)
            if data is None:
                continue
            repeat = rule.limit.count + 1 if rule.limit is not None else 1
            decided = decide(self.policy, data, repeat)
            if rule.name in decided.matched and (not rule.terminal or decided.decision.rule == rule.name):
                return public_event(data)
            if model is not first:  # the later models are of the rules _reach asked about only
                stop = self._first_stop(model)
                if stop is None or stop < rule.index:
                    continue
            if exact and not repaired:
                raise AnalysisBug(
                    f"rule {rule.name!r}: the solver's event {data} should be decided by it, the "
                    f"engine decides {decided.decision.to_json()} (matched {decided.matched})"
                )
        return None

    def _shadow_witness(
        self, rule: RuleFormula, by: list[str], first: z3.ModelRef | None
    ) -> dict[str, Any] | None:
        """An event the rule's conditions hold for, decided by an earlier rule (one of `by`, or
        another earlier rule that catches it first); `first`: a model of the rule's match, if any."""
        exact = self._exact_up_to(rule)
        tried = [first] if first is not None else []
        for model in chain(tried, self.session.models([rule.m, *rule.defs], self._fresh(rule))):
            data, repaired = event_json(model, self.ev, repair=True)
            if data is None:
                continue
            decided = decide(self.policy, data)
            earlier = {r.name for r in self.formula.rules[: rule.index]}
            if rule.name not in decided.matched and decided.decision.rule in earlier:
                return public_event(data)
            if exact and not repaired:
                raise AnalysisBug(
                    f"rule {rule.name!r} is shadowed by {by}, but the engine decides {data} as "
                    f"{decided.decision.to_json()} (matched {decided.matched})"
                )
        return None


def analyze(policy: Policy, *, witnesses: bool = True, timeout_ms: int = SOLVER_TIMEOUT_MS) -> Analysis:
    return Analyzer(policy, witnesses=witnesses, timeout_ms=timeout_ms).run()
