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
from ..runtime import Policy
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
        solver.add(self.ev.conjunction())
        solver.add(*formulas)
        result = solver.check()
        if result == z3.unknown:
            self.last_reason = solver.reason_unknown()
        return result, (solver.model() if result == z3.sat else None)

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
        defs = self.formula.all_defs
        fresh = self._fresh(rule)
        # Reached and matching, with every rule's definitions: a model is then also an event whose
        # whole walk (and the walk without this rule) can be read off it.
        # the walk up to this rule, leaving out the rules whose guards it can never meet
        relevant = [
            r
            for r in self.formula.rules[: rule.index]
            if not disjoint(self.guards[rule.index], self.guards[r.index])
        ]
        upto = [z3.And(*[z3.Not(r.s) for r in relevant], *[d for r in [*relevant, rule] for d in r.defs])]
        reached, model = s.solve([rule.m, *upto], fresh)
        if reached == z3.unknown:
            return self._gave_up(rule), None
        if reached == z3.unsat:
            reached_err = s.solve([rule.e, *upto])[0] if oed else z3.unsat
            if reached_err == z3.unknown:
                return self._gave_up(rule), None
            if reached_err == z3.unsat:
                can_match = s.solve([rule.m, *rule.defs])[0]
                can_err = s.solve([rule.e, *rule.defs])[0] if oed else z3.unsat
                if z3.unknown in (can_match, can_err):
                    return self._gave_up(rule), None
                if can_match == z3.unsat and can_err == z3.unsat:
                    notes = normalisation_notes(checked)
                    reason = "; ".join(notes) if notes else "no event satisfies its on/when/unless"
                    return Finding("unsatisfiable", rule.name, rule.line, reason=reason), None
                by = self._covering(rule, can_match, can_err)
                witness = self._shadow_witness(rule, by) if self.witnesses else None
                return Finding("shadowed", rule.name, rule.line, by=by, witness=witness), None
        witness = self._live_witness(rule, model, upto, fresh) if model is not None else None
        # Not redundant when the engine itself decides the witness otherwise without the rule;
        # else the solver says whether any event changes.
        if witness is None or outcome_only(decide(self.policy, witness).decision) == outcome_only(
            decide(without_rule(self.policy, rule.index), witness).decision
        ):
            changes = self.formula.removal_changes(rule.index)
            result, _ = s.solve([rule.r, changes, *defs])
            if result == z3.unsat:
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

    def _covering(self, rule: RuleFormula, can_match: Any, can_err: Any) -> list[str]:
        """The earlier rules that catch every event this rule would match (or raise for): an
        unsat core of "no earlier rule stops" (z3 minimises it), under assumptions in one solver."""
        triggers = [t for t, possible in ((rule.m, can_match), (rule.e, can_err)) if possible != z3.unsat]
        # rules found never to decide are left out: the first rule that stops an event decides it
        earlier = [
            r
            for r in self.formula.rules[: rule.index]
            if (r.terminal or self.formula.oed) and r.name not in self.dead
        ]
        names: set[str] = set()
        for trigger in triggers:
            solver = z3.Solver()
            solver.set("timeout", self.session.timeout_ms)
            solver.set("core.minimize", True)
            solver.add(self.ev.conjunction(), *self.formula.defs_upto(rule.index), trigger)
            flags = {}
            for r in self.formula.rules[: rule.index]:
                if r in earlier:
                    flag = z3.Bool(f"passes {r.name}")
                    solver.add(flag == z3.Not(r.s))
                    flags[str(flag)] = r.name
                else:
                    solver.add(z3.Not(r.s))  # a non-terminal rule never stops the walk
            if solver.check(*[z3.Bool(f) for f in flags]) == z3.unsat:
                names |= {flags[str(lit)] for lit in solver.unsat_core() if str(lit) in flags}
            else:  # the solver could not say under assumptions: every rule that decides some such event
                for r in earlier:
                    if (
                        self.session.solve([trigger, r.s, r.r, *self.formula.defs_upto(rule.index)])[0]
                        != z3.unsat
                    ):
                        names.add(r.name)
        return [r.name for r in earlier if r.name in names]

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
            if exact and not repaired:
                raise AnalysisBug(
                    f"rule {rule.name!r}: the solver's event {data} should be decided by it, the "
                    f"engine decides {decided.decision.to_json()} (matched {decided.matched})"
                )
        return None

    def _shadow_witness(self, rule: RuleFormula, by: list[str]) -> dict[str, Any] | None:
        """An event the rule's conditions hold for, decided by an earlier rule (one of `by`, or
        another earlier rule that catches it first)."""
        exact = self._exact_up_to(rule)
        for model in self.session.models([rule.m, *self.formula.defs_upto(rule.index)], self._fresh(rule)):
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
