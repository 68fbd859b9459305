"""A policy's first-match walk as z3 formulas (docs/semantics.md, step 3-5).

Per rule i, over the symbolic event: `m[i]` the rule matches (its `on` includes the kind, every
`when` is true, every `unless` false, and, for a rule with `limit`, a free flag says the window
is exceeded: any state), `e[i]` a condition or the limit key raises, `s[i]` the walk stops here
(a terminal rule matches, or an error under `on error deny`), `r[i]` the walk reaches rule i.
The decision: the outcome code and deciding rule of the first stop (else the default), and one
flag per obligation (copy to, disclaimer, tag, audit) collected on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lark
import z3

from ..addresses import AddressError, normalise_domain, parse_address
from ..cel.fastparse import rule_name
from ..nodes import EVENT_KINDS
from ..runtime import EVALUATION_ERROR_REASON, Policy
from .symbolic import FALSE, TRUE, Context, Encoder, SymEvent, Unsupported, free_reads, zstr


def _or(a: Any, b: Any) -> Any:
    """a ∨ b without z3py's per-call checks (both are Bool expressions of the main context)."""
    if z3.is_false(a):
        return b
    if z3.is_false(b):
        return a
    args = (z3.Ast * 2)(a.as_ast(), b.as_ast())
    return z3.BoolRef(z3.z3core.Z3_mk_or(a.ctx_ref(), 2, args), a.ctx)


def _and(a: Any, b: Any) -> Any:
    if z3.is_false(a) or z3.is_false(b):
        return FALSE
    args = (z3.Ast * 2)(a.as_ast(), b.as_ast())
    return z3.BoolRef(z3.z3core.Z3_mk_and(a.ctx_ref(), 2, args), a.ctx)


NEVER_RAISES_TIMEOUT_MS = 200


def _raises(v: Any, cache: dict[int, tuple[Any, Any]]) -> Any:
    """When the condition `v` is an error: neither true nor false. Most conditions never raise,
    and z3 proves it at once alone, while the same "neither" in a question about the whole walk
    (the complement of a regular expression...) can cost it seconds: FALSE when proven. `cache`:
    by the formula's id (z3 shares equal terms: diff's two policies ask once)."""
    raises = z3.simplify(z3.Not(z3.Or(v.t, v.f)))
    if z3.is_false(raises):
        return FALSE
    known = cache.get(raises.get_id())
    if known is not None:
        return known[1]
    cache[raises.get_id()] = (raises, _proven_raises(raises))  # the term kept: its id stays its own
    return cache[raises.get_id()][1]


def _proven_raises(raises: Any) -> Any:
    solver = z3.Solver()
    solver.set("timeout", NEVER_RAISES_TIMEOUT_MS)
    solver.add(raises)
    if solver.check() == z3.unsat:  # for any value of every variable: never an error
        return FALSE
    return raises


def string_literals(tree: Any) -> list[str]:
    """The plain string literals (no escapes) in a condition's tree."""
    out = []
    if isinstance(tree, lark.Tree):
        for child in tree.children:
            if isinstance(child, lark.Token):
                text = str(child)
                if (
                    child.type == "STRING_LIT"
                    and len(text) >= 2
                    and text[0] == text[-1]
                    and text[0] in "\"'"
                    and "\\" not in text
                ):
                    out.append(text[1:-1])
            else:
                out.extend(string_literals(child))
    return out


def _party_comparisons(tree: Any, lists: Any) -> set[tuple[str, str]]:
    """(field, literal) for every `P.domain|address|user ==/!=/in` a literal, list literal or list."""
    from .guards import _strings
    from .symbolic import unwrap

    out: set[tuple[str, str]] = set()
    if not isinstance(tree, lark.Tree):
        return out
    if rule_name(tree.data) == "relation" and len(tree.children) == 2:
        op_node, right = tree.children
        if rule_name(op_node.data) in ("relation_eq", "relation_ne", "relation_in"):
            left = op_node.children[0]
            for a, b in ((left, right), (right, left)):
                node = unwrap(a)
                if (
                    isinstance(node, lark.Tree)
                    and rule_name(node.data) == "member_dot"
                    and str(node.children[1]) in ("domain", "address", "user")
                ):
                    target = unwrap(node.children[0])
                    if (
                        isinstance(target, lark.Tree)
                        and rule_name(target.data) == "ident"
                        and str(target.children[0]) in ("sender", "recipient")
                    ):
                        values = _strings(b, dict(lists))
                        out |= {(str(node.children[1]), v) for v in values or ()}
    for child in tree.children:
        out |= _party_comparisons(child, lists)
    return out


def _is_normal_domain(text: str) -> bool:
    try:
        return normalise_domain(text) == text
    except AddressError:
        return False


def _is_normal_address(text: str) -> bool:
    try:
        return any(parse_address(text, protocol).address == text for protocol in ("xmpp", "sip"))
    except AddressError:
        return False


Item = tuple[
    str, str | None
]  # ("copy_to", address) | ("disclaimer", text) | ("tag", label) | ("audit", None)


@dataclass
class Tables:
    """Codes shared by every policy encoded over one event: outcomes and rule names."""

    outcomes: dict[tuple[Any, ...], int] = field(default_factory=dict)
    names: dict[str | None, int] = field(default_factory=lambda: {None: 0})
    overs: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    raises: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # _raises, by formula id

    def outcome(self, value: tuple[Any, ...]) -> int:
        return self.outcomes.setdefault(value, len(self.outcomes))

    def name(self, value: str | None) -> int:
        return self.names.setdefault(value, len(self.names))

    def outcome_of(self, code: int) -> tuple[Any, ...]:
        return next(k for k, v in self.outcomes.items() if v == code)

    def name_of(self, code: int) -> str | None:
        return next(k for k, v in self.names.items() if v == code)


@dataclass
class RuleFormula:
    name: str
    index: int
    line: int
    file: str
    terminal: bool
    items: tuple[Item, ...]
    reasons: list[str]
    limit: Any  # CompiledLimit or None
    over: Any  # z3 Bool or None
    m: Any
    e: Any  # (FALSE without on error deny: only read with it)
    s: Any
    r: Any
    outcome: int
    defs: list[Any]  # what defines m, e, s and the reach of the next rule
    not_s: Any = None  # ¬s, built once
    stop: Any = None  # s as a formula over the event's variables (for evaluating it in a model)


def _items(rule: Any) -> tuple[Item, ...]:
    out: list[Item] = (
        [("copy_to", a) for a in rule.copy_to]
        + [("disclaimer", d) for d in rule.disclaimers]
        + [("tag", t) for t in rule.tags]
    )
    if rule.audit:
        out.append(("audit", None))
    return tuple(out)


class PolicyFormula:
    def __init__(self, policy: Policy, ev: SymEvent, tag: str, tables: Tables):
        if policy.model is None:
            raise ValueError("the policy was not loaded from text (no model to analyse)")
        self.policy = policy
        self.ev = ev
        self.tag = tag
        self.tables = tables
        self.ctx = Context(ev, tag, policy.local_domains, dict(policy.lists), policy.directory)
        self.encoder = Encoder(self.ctx)
        self.defs: list[Any] = []
        self.rules: list[RuleFormula] = []
        self.oed = policy.on_error_deny
        self.error_outcome = tables.outcome(("deny", EVALUATION_ERROR_REASON, None, None))
        self.default_outcome = tables.outcome((policy.default_effect, policy.default_reason, None, None))
        self._exclude_foreign_literals(policy)
        reach: Any = TRUE
        for i, (compiled, checked) in enumerate(zip(policy.rules, policy.model.rules, strict=True)):
            formula = self._rule(i, compiled, checked, reach)
            self.rules.append(formula)
            reach = z3.Bool(f"{tag}r{i + 1}")
            formula.defs.append(reach == z3.And(formula.r, z3.Not(formula.s)))
            self.defs += formula.defs
        self.reach_end = reach
        out: Any = z3.IntVal(self.default_outcome)
        name: Any = z3.IntVal(tables.name(None))
        for rule in reversed(self.rules):
            if rule.terminal:
                stop_out = z3.If(rule.m, z3.IntVal(rule.outcome), z3.IntVal(self.error_outcome))
            else:
                stop_out = z3.IntVal(self.error_outcome)
            out = z3.If(rule.s, stop_out, out)
            name = z3.If(rule.s, z3.IntVal(tables.name(rule.name)), name)
        self.out = z3.Int(f"{tag}out")
        self.name = z3.Int(f"{tag}rule")
        self.decision_defs = [self.out == out, self.name == name]
        self.defs += self.decision_defs
        self.items: dict[Item, Any] = {}
        for rule in self.rules:
            for item in rule.items:
                self.items[item] = z3.Or(self.items.get(item, FALSE), z3.And(rule.r, rule.m))
            if self.oed:
                self.items[("audit", None)] = z3.Or(
                    self.items.get(("audit", None), FALSE), z3.And(rule.r, rule.e)
                )
        self._suffix_out: dict[int, Any] = {}
        self._suffix_items: dict[tuple[int, Item], Any] = {}
        self._prefix_items: dict[tuple[int, Item], Any] = {}
        self._upto: list[Any] = []
        self._all: Any = None
        self._first_stop: Any = None

    def _exclude_foreign_literals(self, policy: Policy) -> None:
        """Every string literal and list entry the policy holds that no normalised domain,
        address or user can equal (docs/addresses.md) is excluded as such: `recipient.domain ==
        "Partner.Example"` can then never hold. A fact about events, so it only narrows."""
        compared: set[tuple[str, str]] = set()  # (field, literal) compared by == / != / in
        for checked in policy.model.rules:  # type: ignore[union-attr]
            for tree in list(checked.when) + list(checked.unless):
                compared |= _party_comparisons(tree, policy.lists)
        for field_name, text in sorted(compared):
            try:
                literal = zstr(text)
            except Unsupported:
                continue
            fields = []
            if field_name in ("domain", "address") and not _is_normal_domain(text):
                fields.append("domain")  # an address without a user is its domain
            if field_name == "address" and not (_is_normal_domain(text) or _is_normal_address(text)):
                fields.append("address")
            if field_name == "user" and any("A" <= c <= "Z" for c in text):
                fields.append("user")
            for party in self.ev.parties.values():
                for name in fields:
                    self.ev.exclude(getattr(party, name) != literal)

    def _rule(self, i: int, compiled: Any, checked: Any, reach: Any) -> RuleFormula:
        ev, enc = self.ev, self.encoder
        enc.reasons = []
        passed: Any = (
            TRUE
            if compiled.kinds is None
            else z3.Or([ev.kind == EVENT_KINDS.index(k) for k in sorted(compiled.kinds)])
        )
        err: Any = FALSE
        trees = [(t, True) for t in checked.when] + [(t, False) for t in checked.unless]
        for tree, expected in trees:
            v = enc.condition(tree)
            ok = v.t if expected else v.f
            # without `on error deny` an error only makes the rule not match: `e` is never read
            raises = _raises(v, self.tables.raises) if self.oed else FALSE
            if not z3.is_false(raises):
                err = z3.Or(err, z3.And(passed, raises))
            passed = z3.And(passed, ok)
        over = None
        if compiled.limit is not None:
            key_err = self._limit_key_error(checked.limit_key)
            err = z3.Or(err, z3.And(passed, key_err))
            signature = (
                compiled.name,
                compiled.limit.count,
                compiled.limit.seconds,
                compiled.limit.text,
                tuple(repr(t) for t, _ in trees),
                self.ctx.fingerprint,
            )
            over = self.tables.overs.get(signature)
            if over is None:
                over = self.tables.overs[signature] = z3.Bool(f"{self.tag}over{i}")
            passed = z3.And(passed, z3.Not(key_err), over)
        m, e, s = z3.Bool(f"{self.tag}m{i}"), z3.Bool(f"{self.tag}e{i}"), z3.Bool(f"{self.tag}s{i}")
        terminal = compiled.effect is not None
        stop = z3.Or(z3.And(m, z3.BoolVal(terminal)), z3.And(e, z3.BoolVal(self.oed)))
        stops = ([passed] if terminal else []) + ([err] if self.oed else [])
        stop_expr = z3.Or(stops) if len(stops) > 1 else stops[0] if stops else FALSE
        defs = [m == passed, e == err, s == stop]
        if i == 0:
            r = z3.Bool(f"{self.tag}r0")
            defs.append(r == TRUE)
        else:
            r = reach
        outcome = (
            self.tables.outcome((compiled.effect, compiled.reason, compiled.redirect_to, compiled.route_via))
            if terminal
            else self.error_outcome
        )
        line = compiled.location.line if compiled.location is not None else 0
        source = compiled.location.file if compiled.location is not None else ""
        return RuleFormula(
            compiled.name,
            i,
            line,
            source,
            terminal,
            _items(compiled),
            list(dict.fromkeys(enc.reasons)),
            compiled.limit,
            over,
            m,
            e,
            s,
            r,
            outcome,
            defs,
            z3.Not(s),
            stop_expr,
        )

    def _limit_key_error(self, tree: Any) -> Any:
        """Whether evaluating the limit key raises: a party (or one of its string fields) never
        does; an expression the encoder reads exactly gives its error formula; else it may."""
        if tree is None:
            return FALSE
        reads = free_reads(tree, frozenset(self.ctx.lists))
        if reads <= {"sender", "recipient"}:
            return FALSE
        try:
            v = self.encoder.encode(tree, {})
        except Unsupported as exc:
            self.encoder.reasons.append(f"limit key: {exc}")
            return z3.FreshBool(f"{self.tag}keyerr")
        if v.type == "bool":
            return z3.Not(z3.Or(v.t, v.f))
        return v.err

    # -- what a rule's removal changes (analyze: redundant) -------------------------------------------

    def suffix_out(self, k: int) -> Any:
        """The outcome when the walk starts at rule k (k == len(rules): the default)."""
        if k not in self._suffix_out:
            for j in range(len(self.rules), k - 1, -1):
                if j in self._suffix_out:
                    continue
                if j == len(self.rules):
                    self._suffix_out[j] = z3.IntVal(self.default_outcome)
                    continue
                rule = self.rules[j]
                stop_out = (
                    z3.If(rule.m, z3.IntVal(rule.outcome), z3.IntVal(self.error_outcome))
                    if rule.terminal
                    else z3.IntVal(self.error_outcome)
                )
                self._suffix_out[j] = z3.If(rule.s, stop_out, self._suffix_out[j + 1])
        return self._suffix_out[k]

    def suffix_item(self, k: int, item: Item) -> Any:
        """Whether the walk started at rule k collects `item` (built once per item, back to front,
        through z3's C API: thousands of rules times hundreds of items)."""
        key = (k, item)
        if key not in self._suffix_items:
            audit_errors = item == ("audit", None) and self.oed
            last = max((r.index for r in self.rules if item in r.items), default=-1)
            for j in range(len(self.rules), k - 1, -1):
                if (j, item) in self._suffix_items:
                    continue
                if j == len(self.rules) or (j > last and not audit_errors):
                    self._suffix_items[(j, item)] = FALSE  # no rule from here on adds it
                    continue
                rule = self.rules[j]
                here = rule.m if item in rule.items else FALSE
                if audit_errors:
                    here = _or(here, rule.e)
                self._suffix_items[(j, item)] = _or(here, _and(rule.not_s, self._suffix_items[(j + 1, item)]))
        return self._suffix_items[key]

    def prefix_item(self, k: int, item: Item) -> Any:
        """Whether the walk has collected `item` before rule k (built front to back, once)."""
        key = (k, item)
        if key not in self._prefix_items:
            audit_errors = item == ("audit", None) and self.oed
            start = max((j for j in range(k + 1) if (j, item) in self._prefix_items), default=0)
            value = self._prefix_items.get((start, item), FALSE)
            for j in range(start, k):
                rule = self.rules[j]
                if item in rule.items:
                    value = _or(value, _and(rule.r, rule.m))
                if audit_errors:
                    value = _or(value, _and(rule.r, rule.e))
                self._prefix_items[(j + 1, item)] = value
            self._prefix_items[key] = value
        return self._prefix_items[key]

    def removal_changes(self, i: int) -> Any:
        """Events (reaching rule i) whose effect, reason, redirect, route or obligations change
        when rule i is removed: the walk then goes on at rule i + 1 with what it has collected."""
        parts = [self.suffix_out(i) != self.suffix_out(i + 1)]
        for item in self.items:
            parts.append(
                z3.And(
                    z3.Not(self.prefix_item(i, item)),
                    self.suffix_item(i, item) != self.suffix_item(i + 1, item),
                )
            )
        return z3.Or(parts)

    def removal_changes_within(self, i: int, members: list[int]) -> list[Any]:
        """removal_changes(i) and the reach of rule i over the walk of `members` alone (rule
        indexes in order, i among them), with their definitions: the whole question of "does
        removing rule i change anything" when the rules left out neither match nor raise wherever
        rule i does (their guards are disjoint, policyplug.analysis.guards). A change needs rule i
        to match or raise (else the walk from i is the walk from i + 1), so on every such event the
        left-out rules do nothing, and the two walks decide alike."""
        rules = [self.rules[k] for k in members]
        pos = members.index(i)
        reach: list[Any] = []
        current: Any = TRUE
        for rule in rules:
            reach.append(current)
            current = _and(current, rule.not_s)

        def stop_out(rule: RuleFormula) -> Any:
            if rule.terminal:
                return z3.If(rule.m, z3.IntVal(rule.outcome), z3.IntVal(self.error_outcome))
            return z3.IntVal(self.error_outcome)

        out: Any = z3.IntVal(self.default_outcome)
        for rule in reversed(rules[pos + 1 :]):
            out = z3.If(rule.s, stop_out(rule), out)
        parts = [z3.If(rules[pos].s, stop_out(rules[pos]), out) != out]
        # the walk from pos + 1 reaching member q: built once, shared by every item
        onward: list[Any] = [TRUE] * len(rules)
        current = TRUE
        for q in range(pos + 1, len(rules)):
            onward[q] = current
            current = _and(current, rules[q].not_s)
        items = list(dict.fromkeys(item for rule in rules for item in rule.items))
        if self.oed and ("audit", None) not in items:
            items.append(("audit", None))
        for item in items:
            audit_errors = item == ("audit", None) and self.oed
            holders = [q for q, rule in enumerate(rules) if audit_errors or item in rule.items]

            def here(rule: RuleFormula, item: Item = item, audit_errors: bool = audit_errors) -> Any:
                value = rule.m if item in rule.items else FALSE
                return _or(value, rule.e) if audit_errors else value

            before = z3.Or([_and(reach[q], here(rules[q])) for q in holders if q < pos] or [FALSE])
            after = z3.Or([_and(onward[q], here(rules[q])) for q in holders if q > pos] or [FALSE])
            with_rule = _or(here(rules[pos]), _and(rules[pos].not_s, after))
            if z3.is_false(with_rule) and z3.is_false(after):
                continue
            parts.append(z3.And(z3.Not(before), with_rule != after))
        defs = [d for rule in rules for d in rule.defs]
        return [reach[pos], z3.Or(parts), *defs]

    def defs_upto(self, k: int) -> list[Any]:
        """The definitions of rules 0..k (all a query about rule k's reach and match needs), as
        one formula built incrementally (adding thousands of assertions per query costs more
        than solving it)."""
        while len(self._upto) <= k:
            rule = self.rules[len(self._upto)]
            previous = self._upto[-1] if self._upto else TRUE
            self._upto.append(z3.And(previous, *rule.defs))
        return [self._upto[k]]

    @property
    def all_defs(self) -> list[Any]:
        """Every rule's definitions and the decision's, as one formula."""
        if self._all is None:
            self._all = (
                z3.And(*self.defs_upto(len(self.rules) - 1), *self.decision_defs)
                if self.rules
                else z3.And(*self.decision_defs)
            )
        return [self._all]

    @property
    def first_stop(self) -> Any:
        """The index of the rule the walk stops at (len(rules): none), as a term over the event's
        variables alone: evaluated in a model it says which rule decides that event."""
        if self._first_stop is None:
            term: Any = z3.IntVal(len(self.rules))
            for rule in reversed(self.rules):
                if not z3.is_false(rule.stop):
                    term = z3.If(rule.stop, z3.IntVal(rule.index), term)
            self._first_stop = term
        return self._first_stop

    def fresh_limits(self) -> list[Any]:
        """Assumptions: no limit window is exceeded (the state of a fresh engine)."""
        return [z3.Not(r.over) for r in self.rules if r.over is not None]
