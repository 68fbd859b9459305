"""`policyplug diff OLD NEW`: the events two policies decide differently (docs/analysis.md).

Both policies are encoded over one symbolic event; a model where their outcome code (effect,
reason, redirect, route), deciding rule or any obligation differ is a change. Each distinct
pair (old deciding rule, new deciding rule) is reported once, with a witness the engine decides
that way under each policy, then excluded, until no difference is left (proven: `same`) or the
solver cannot say (`unknown`, never reported as the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import z3

from ..runtime import Policy
from .analyze import SOLVER_TIMEOUT_MS, Session
from .semantics import PolicyFormula, Tables
from .symbolic import FALSE, SymEvent
from .witness import AnalysisBug, decide, event_json, outcome_key, public_event

MAX_CHANGES = 500


@dataclass
class Diff:
    changes: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.changes and not self.unknown

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"same": self.same, "changes": self.changes}
        if self.unknown:
            out["unknown"] = self.unknown
        return out


def diff(
    old: Policy, new: Policy, *, timeout_ms: int = SOLVER_TIMEOUT_MS, max_changes: int = MAX_CHANGES
) -> Diff:
    ev = SymEvent()
    tables = Tables()
    a = PolicyFormula(old, ev, "old.", tables)
    b = PolicyFormula(new, ev, "new.", tables)
    session = Session(ev, timeout_ms)
    items = list(dict.fromkeys([*a.items, *b.items]))
    differ = z3.Or(
        a.out != b.out,
        a.name != b.name,
        *[a.items.get(item, FALSE) != b.items.get(item, FALSE) for item in items],
    )
    base = [*a.all_defs, *b.all_defs, differ]
    fresh = [*a.fresh_limits(), *b.fresh_limits()]
    exact = all(not r.reasons and r.limit is None for r in [*a.rules, *b.rules])
    result = Diff()
    seen: set[tuple[Any, Any]] = set()
    blocked: list[Any] = []
    while len(result.changes) + len(result.unknown) < max_changes:
        answer, model = session.solve([*base, *blocked], [*fresh, *ev.nice])
        if answer == z3.unsat:
            break
        if answer == z3.unknown or model is None:
            result.unknown.append({"reason": f"the solver gave up ({session.last_reason})"})
            break
        code_a, code_b = model.eval(a.name).as_long(), model.eval(b.name).as_long()
        pair = [a.name == code_a, b.name == code_b]
        found = None
        for candidate in chain([model], session.models([*base, *blocked, *pair], fresh)):
            data, repaired = event_json(candidate, ev, repair=True)
            if data is None:
                continue
            decided_a, decided_b = decide(old, data), decide(new, data)
            if outcome_key(decided_a.decision) != outcome_key(decided_b.decision):
                found = (data, decided_a.decision, decided_b.decision)
                break
            if exact and not repaired:
                raise AnalysisBug(
                    f"the policies should decide {data} differently; the engine decides both "
                    f"{decided_a.decision.to_json()}"
                )
        names = (tables.name_of(code_a), tables.name_of(code_b))
        if found is None:
            reasons = sorted({why for r in [*a.rules, *b.rules] for why in r.reasons})
            result.unknown.append(
                {
                    "old_rule": names[0],
                    "new_rule": names[1],
                    "reason": "; ".join(reasons) or "no event could be built for the difference",
                }
            )
        else:
            data, decision_a, decision_b = found
            key = (decision_a.rule, decision_b.rule)
            if key not in seen:
                seen.add(key)
                result.changes.append(
                    {"witness": public_event(data), "old": decision_a.to_json(), "new": decision_b.to_json()}
                )
        blocked.append(z3.Not(z3.And(*pair)))
    return result
