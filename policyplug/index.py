"""Rule indexing: pick the rules that can match an event without walking all of them.

A rule whose `when` is a conjunction containing `FIELD == "literal"`, `FIELD in LIST` or
`FIELD in ["a", "b"]` (FIELD one of kind, direction, sender/recipient .domain/.address), or
`"literal" in sender.groups` (or recipient.groups), or `sender.local` / `!recipient.local` (which
allow two directions each), or `size > 1000000` (any comparison of `size` with an int), can only
match events whose FIELD takes one of those values (whose groups contain it, whose size is in
range). Skipping it otherwise is exact, not a heuristic: CEL's `&&` is false as soon as one side
is false, even when another side errs, so a skipped rule would neither have matched nor recorded
an error; a guard beside an operand that can raise past `&&` (cel.compile.RaiseCheck) is not
used (guards_of). Only the first `when` of a rule is read, and later ones only while the earlier are
made of such tests alone: conditions run one after the other, and an error in one is reported
even if a later one is false. Candidates keep file order, so first-match semantics are unchanged
(tests compare indexed and unindexed runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import lark

from .cel.compile import RaiseCheck, has_empty_literal
from .cel.fastparse import PASSTHROUGH, rule_name
from .compiled import CompiledRule
from .schema import DIRECTIONS, EVENT_KINDS

# The fields an index may be built on, most selective first. Group fields are lists: a rule
# guarded by `"g" in sender.groups` is found through each of the sender's groups.
INDEXED_FIELDS = (
    "recipient.address",
    "sender.address",
    "recipient.domain",
    "sender.domain",
    "sender.groups",
    "recipient.groups",
    "direction",
)
MULTI_VALUED = frozenset({"sender.groups", "recipient.groups"})
_PLAIN_STRING = re.compile(r'^(?:"([^"\\]*)"|\'([^\'\\]*)\')\Z')


def _strip(tree: Any) -> Any:
    while (
        isinstance(tree, lark.Tree)
        and len(tree.children) == 1
        and rule_name(tree.data) in PASSTHROUGH
        and isinstance(tree.children[0], lark.Tree)
    ):
        tree = tree.children[0]
    return tree


def _conjuncts(tree: Any) -> list[Any]:
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and rule_name(tree.data) == "conditionaland" and len(tree.children) == 2:
        return _conjuncts(tree.children[0]) + _conjuncts(tree.children[1])
    return [tree]


def _field_path(tree: Any) -> str | None:
    tree = _strip(tree)
    if not isinstance(tree, lark.Tree):
        return None
    data = rule_name(tree.data)
    if data == "ident":
        name = str(tree.children[0])
        return name if name in ("direction", "kind") else None
    if data == "member_dot":
        base = _strip(tree.children[0])
        if isinstance(base, lark.Tree) and rule_name(base.data) == "ident":
            path = f"{base.children[0]}.{tree.children[1]}"
            return path if path in INDEXED_FIELDS else None
    return None


def _string_literal(tree: Any) -> str | None:
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and tree.children and rule_name(tree.data) == "literal":
        token = tree.children[0]
        if isinstance(token, lark.Token) and token.type == "STRING_LIT":
            match = _PLAIN_STRING.match(str(token))
            if match:
                return match.group(1) if match.group(1) is not None else match.group(2)
    return None


def _string_set(tree: Any, lists: dict[str, tuple[str, ...]]) -> frozenset[str] | None:
    tree = _strip(tree)
    if not isinstance(tree, lark.Tree):
        return None
    data = rule_name(tree.data)
    if data == "ident" and str(tree.children[0]) in lists:
        return frozenset(lists[str(tree.children[0])])
    if data == "list_lit":
        values = []
        items = tree.children[0].children if tree.children else []
        for item in items:
            value = _string_literal(item)
            if value is None:
                return None
            values.append(value)
        return frozenset(values)
    return None


# `sender.local`, `!recipient.local`... as a conjunct: the directions it allows
_LOCAL_DIRECTIONS = {
    ("sender.local", False): frozenset({"internal", "outbound"}),
    ("sender.local", True): frozenset({"inbound", "transit"}),
    ("recipient.local", False): frozenset({"internal", "inbound"}),
    ("recipient.local", True): frozenset({"outbound", "transit"}),
}


def _local_directions(tree: Any) -> frozenset[str] | None:
    negated = False
    if (
        isinstance(tree, lark.Tree)
        and len(tree.children) == 2
        and rule_name(tree.data) == "unary"
        and isinstance(tree.children[0], lark.Tree)
        and rule_name(tree.children[0].data) == "unary_not"
    ):
        negated, tree = True, _strip(tree.children[1])
    if not (isinstance(tree, lark.Tree) and rule_name(tree.data) == "member_dot"):
        return None
    base = _strip(tree.children[0])
    if isinstance(base, lark.Tree) and rule_name(base.data) == "ident":
        return _LOCAL_DIRECTIONS.get((f"{base.children[0]}.{tree.children[1]}", negated))
    return None


_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
INT64 = 2**63
_FLIPPED = {
    "relation_lt": "relation_gt",
    "relation_le": "relation_ge",
    "relation_gt": "relation_lt",
    "relation_ge": "relation_le",
    "relation_eq": "relation_eq",
}


def _int_literal(tree: Any) -> int | None:
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and len(tree.children) == 1 and rule_name(tree.data) == "literal":
        token = tree.children[0]
        if isinstance(token, lark.Token) and token.type == "INT_LIT" and _INT.fullmatch(str(token)):
            value = int(str(token))
            if -INT64 <= value < INT64:
                return value
    return None


def _is_size(tree: Any) -> bool:
    tree = _strip(tree)
    return isinstance(tree, lark.Tree) and rule_name(tree.data) == "ident" and str(tree.children[0]) == "size"


def _size_interval(operation: str, lhs: Any, rhs: Any) -> tuple[float, float] | None:
    """`size < 100`, `1000 <= size`...: the sizes [lo, hi) it allows, or None."""
    if operation not in _FLIPPED:
        return None
    if _is_size(lhs):
        bound = _int_literal(rhs)
    elif _is_size(rhs):
        bound, operation = _int_literal(lhs), _FLIPPED[operation]
    else:
        return None
    if bound is None:
        return None
    inf = float("inf")
    return {
        "relation_lt": (-inf, bound),
        "relation_le": (-inf, bound + 1),
        "relation_gt": (bound + 1, inf),
        "relation_ge": (bound, inf),
        "relation_eq": (bound, bound + 1),
    }[operation]


def _guard(conjunct: Any, lists: dict[str, tuple[str, ...]]) -> tuple[str, Any] | None:
    """(field, allowed values) when `conjunct` is a guard: "direction" for the local flags, "size"
    with an interval [lo, hi) for comparisons of `size` with an int; None for anything else."""
    directions = _local_directions(conjunct)
    if directions is not None:
        return "direction", directions
    if not (
        isinstance(conjunct, lark.Tree)
        and len(conjunct.children) == 2
        and rule_name(conjunct.data) == "relation"
    ):
        return None
    operator, rhs = conjunct.children
    if not isinstance(operator, lark.Tree) or not operator.children:
        return None
    lhs = operator.children[0]
    operation = rule_name(operator.data)
    interval = _size_interval(operation, lhs, rhs)
    if interval is not None:
        return "size", interval
    field, values = None, None
    if operation == "relation_eq":
        field, literal = _field_path(lhs), _string_literal(rhs)
        if field is None:
            field, literal = _field_path(rhs), _string_literal(lhs)
        values = frozenset([literal]) if literal is not None else None
    elif operation == "relation_in":
        field, values = _field_path(lhs), _string_set(rhs, lists)
        if field is None:
            # "literal" in sender.groups: the rule needs that group
            group_field, literal = _field_path(rhs), _string_literal(lhs)
            if group_field in MULTI_VALUED and literal is not None:
                field, values = group_field, frozenset([literal])
        elif field in MULTI_VALUED:
            field = None  # `groups in LIST` is a list-in-list test, not a guard
    return (field, values) if field is not None and values is not None else None


def _conjunct_paths(tree: Any) -> list[tuple[Any, list[Any]]]:
    """The conjuncts of a `&&` chain, each with the other operands of every `&&` above it."""
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and rule_name(tree.data) == "conditionaland" and len(tree.children) == 2:
        left, right = _strip(tree.children[0]), _strip(tree.children[1])
        return [(c, above + [right]) for c, above in _conjunct_paths(left)] + [
            (c, above + [left]) for c, above in _conjunct_paths(right)
        ]
    return [(tree, [])]


def _operand_may_raise(
    tree: Any, when: Any, may_raise: RaiseCheck, guards: dict[int, Any], memo: dict[Any, bool]
) -> bool:
    """May this operand of a `&&` in `when` raise past it (see guards_of)? Its conjuncts that are
    guards cannot (typed comparisons with literals); the others are asked of the compiler.
    `guards`: conjunct id -> its guard or None; `memo` is per `when`."""
    if guards.get(id(tree)) is not None:
        return False  # a guard itself (the usual operand)
    found = memo.get(id(tree))
    if found is None:
        leaves = [c for c, _ in _conjunct_paths(tree)]
        others = [leaf for leaf in leaves if guards.get(id(leaf)) is None]
        found = False
        if others or len(leaves) > 1:
            if "bad" not in memo:
                memo["bad"] = has_empty_literal(when)
            # a `&&` of two non-bools formats both into its error, and that can raise where
            # cel-python cannot print a tree (`[]` or `{}` in the condition; see cel.functions.Err)
            found = (memo["bad"] and len(leaves) > 1) or any(may_raise(leaf, memo["bad"]) for leaf in others)
        memo[id(tree)] = found
    return found


def guards_of(
    when_trees: Sequence[Any], lists: dict[str, tuple[str, ...]], may_raise: RaiseCheck | None = None
) -> dict[str, frozenset[str]]:
    """Every (field -> allowed values) implied by a rule's `when` clauses.

    `sender.local` and `recipient.local` (or their negation) restrict the direction; comparisons
    of `size` with an int give "size" -> the interval [lo, hi) of sizes allowed.

    Exact by construction: a rule may be skipped only where its conditions are false *without an
    error* for the event. A false guard makes each `&&` above it false, absorbing an error of
    the other operand, but only an error CEL absorbs: cel-python evaluates both operands, and
    some errors are raised past `&&` (a macro over a non-list, an error in a map() body; the
    compiler marks them `fatal`, cel.compile.RaiseCheck). So a guard counts only when no other
    operand of a `&&` above it may raise so. A rule's conditions run one after the other, and an
    error in one is reported even if a later one is false: so a later `when` is looked at only
    while every `when` before it is made of guards alone (comparisons that cannot fail)."""
    guards: dict[str, frozenset[str]] = {}
    check = may_raise if may_raise is not None else RaiseCheck(lists)
    for when in when_trees:
        only_guards = True
        paths = _conjunct_paths(when)
        found = {id(conjunct): _guard(conjunct, lists) for conjunct, _ in paths}
        memo: dict[Any, bool] = {}
        for conjunct, beside in paths:
            guard = found[id(conjunct)]
            if guard is None:
                only_guards = False
                continue
            if any(_operand_may_raise(tree, when, check, found, memo) for tree in beside):
                only_guards = False  # a false guard would not hide that error: no skipping on it
                continue
            field, values = guard
            if field == "size":
                if "size" in guards:
                    (lo, hi), (lo2, hi2) = guards["size"], values
                    values = (max(lo, lo2), min(hi, hi2))
                guards["size"] = values
                only_guards = False  # `size` of an event built by hand might not be an int
            elif field in guards and field not in MULTI_VALUED:
                # two guards on one field: both must hold (for groups: either one is enough to index by)
                guards[field] = guards[field] & values
            else:
                guards.setdefault(field, values)
        if not only_guards:
            break
    return guards


class RuleIndex:
    """Candidate rules per (kind, direction, sender, recipient), in file order.

    A plan per (kind, direction) holds the rules that cannot be skipped (no guard, or a guard on
    direction only that this direction satisfies) and one table per guarded field. Which table
    entries an event hits depends only on its kind and on what the policy knows of its two
    parties, so the policy caches each party's *signature* (its local flag and the values of its
    indexed fields that appear in some table) and caches candidates per (kind, signatures), and
    per size bucket when rules have `size` guards."""

    def __init__(
        self,
        plans: dict[str, dict[str, tuple[tuple[CompiledRule, ...], list[Any]]]],
        side_values: dict[str, dict[str, frozenset[str]]],
        sizes: dict[CompiledRule, tuple[float, float]] | None = None,
    ):
        self.plans = plans
        self.side_values = side_values  # "sender" | "recipient" -> field -> values some table holds
        # Rules with a `size` guard, and the bounds of all such guards: an event's size falls in one
        # of the buckets these bounds cut (bisect_right(size_points, size)), and within one bucket
        # every guard holds or fails alike, so candidates are cached per bucket too.
        self.sizes = sizes or {}
        self.size_points = tuple(
            sorted(
                {b for lo_hi in self.sizes.values() for b in lo_hi if b not in (float("inf"), float("-inf"))}
            )
        )

    def signature(self, party: dict[str, Any], side: str) -> tuple[Any, ...]:
        values = self.side_values[side]
        address, domain, groups = values["address"], values["domain"], values["groups"]
        return (
            party["local"],
            party["address"] if party["address"] in address else None,
            party["domain"] if party["domain"] in domain else None,
            tuple(g for g in party["groups"] if g in groups) if groups else (),
        )

    def candidates(
        self,
        kind: str,
        direction: str,
        sender: dict[str, Any],
        recipient: dict[str, Any],
        size_bucket: int = -1,
    ) -> tuple[CompiledRule, ...]:
        """Candidate rules; `size_bucket` is bisect_right(size_points, size) (Policy.decide works it
        out inline, on the hot path), -1 when the event's size is unknown (not an int64)."""
        found = self._candidates(kind, direction, sender, recipient)
        if size_bucket < 0 or not self.sizes:
            return found
        points, sizes = self.size_points, self.sizes
        value = points[size_bucket - 1] if size_bucket > 0 else points[0] - 1  # any size in the bucket
        return tuple(r for r in found if r not in sizes or sizes[r][0] <= value < sizes[r][1])

    def _candidates(
        self, kind: str, direction: str, sender: dict[str, Any], recipient: dict[str, Any]
    ) -> tuple[CompiledRule, ...]:
        by_direction = self.plans.get(kind)
        if by_direction is None:
            return ()
        unguarded, lookups = by_direction[direction]
        found = []
        for party, field, table, multi in lookups:
            value = (sender if party == "sender" else recipient)[field]
            if multi:
                for v in value:
                    rules = table.get(v)
                    if rules:
                        found.append(rules)
                continue
            rules = table.get(value)
            if rules:
                found.append(rules)
        if not found:
            return unguarded
        merged: list[CompiledRule] = list(unguarded)
        for rules in found:
            merged.extend(rules)
        merged.sort(key=attrgetter("index"))
        # one table per rule and plan, but a group-guarded rule may be reached through two groups
        return tuple(dict.fromkeys(merged))


# the party fields among INDEXED_FIELDS: a rule index keeps, per side, the values it has tables for
INDEXED_PARTY_FIELDS = tuple(dict.fromkeys(f.partition(".")[2] for f in INDEXED_FIELDS if "." in f))


def build_index(
    rules: Sequence[CompiledRule], when_trees: Sequence[Sequence[Any]], lists: dict[str, tuple[str, ...]]
) -> RuleIndex | None:
    """The rule index of compiled `rules` (in file order), given each rule's `when` parse trees and
    the policy's lists; None when no rule has a guard (every rule is a candidate)."""
    check = RaiseCheck(lists)
    all_guards = [guards_of(when, lists, check) for when in when_trees]
    if not any(all_guards):
        return None
    plans: dict[str, dict[str, tuple[tuple[CompiledRule, ...], list[Any]]]] = {}
    side_values: dict[str, dict[str, set[str]]] = {
        side: {f: set() for f in INDEXED_PARTY_FIELDS} for side in ("sender", "recipient")
    }
    # per rule, once: the kinds and directions it can match, and the field it is indexed by
    placed = []
    for rule, guards in zip(rules, all_guards, strict=True):
        kinds = EVENT_KINDS if rule.kinds is None else [k for k in EVENT_KINDS if k in rule.kinds]
        if "kind" in guards:  # `kind == "call"` restricts like `on call`
            kinds = [k for k in kinds if k in guards["kind"]]
        directions = (
            [d for d in DIRECTIONS if d in guards["direction"]] if "direction" in guards else DIRECTIONS
        )
        field = next((f for f in INDEXED_FIELDS if f in guards and f != "direction"), None)
        placed.append(
            (rule, frozenset(kinds), frozenset(directions), field, guards.get(field) if field else None)
        )
    for kind in EVENT_KINDS:
        plans[kind] = {}
        for direction in DIRECTIONS:
            unguarded: list[CompiledRule] = []
            tables: dict[str, dict[str, list[CompiledRule]]] = {}
            for rule, rule_kinds, rule_directions, field, values in placed:
                if kind not in rule_kinds or direction not in rule_directions:
                    continue
                if field is None or values is None:  # values is None exactly when field is
                    unguarded.append(rule)
                    continue
                table = tables.setdefault(field, {})
                for value in values:
                    table.setdefault(value, []).append(rule)
            lookups = []
            for name, table in tables.items():
                party, _, key = name.partition(".")
                lookups.append((party, key, {v: tuple(rs) for v, rs in table.items()}, name in MULTI_VALUED))
                side_values[party][key].update(table)
            plans[kind][direction] = (tuple(unguarded), lookups)
    frozen = {side: {f: frozenset(v) for f, v in fields.items()} for side, fields in side_values.items()}
    sizes = {rule: guards["size"] for rule, guards in zip(rules, all_guards, strict=True) if "size" in guards}
    return RuleIndex(plans, frozen, sizes)  # type: ignore[arg-type]
