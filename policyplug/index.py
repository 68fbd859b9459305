"""Rule indexing: pick the rules that can match an event without walking all of them.

A rule whose `when` is a conjunction containing `FIELD == "literal"`, `FIELD in LIST` or
`FIELD in ["a", "b"]` (FIELD one of kind, direction, sender/recipient .domain/.address), or
`"literal" in sender.groups` (or recipient.groups), can only match events whose FIELD takes
one of those values (whose groups contain it). Skipping it otherwise is exact, not a
heuristic: CEL's `&&` is false as soon as one side is false, even when another side errs,
so a skipped rule would neither have matched nor recorded an error. Candidates keep file
order, so first-match semantics are unchanged (tests compare indexed and unindexed runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import lark

from .nodes import EVENT_KINDS

if TYPE_CHECKING:
    from .events import Event
    from .loader import PolicyModel
    from .runtime import CompiledRule, Policy

# The fields an index may be built on, most selective first. Group fields are lists: a rule
# guarded by `"g" in sender.groups` is found through each of the sender's groups.
INDEXED_FIELDS = ("recipient.address", "sender.address", "recipient.domain", "sender.domain", "sender.groups",
                  "recipient.groups", "direction")
MULTI_VALUED = frozenset({"sender.groups", "recipient.groups"})
_PASS_THROUGH = {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary",
                 "member", "primary", "paren_expr"}
_PLAIN_STRING = re.compile(r'^(?:"([^"\\]*)"|\'([^\'\\]*)\')$')
CACHE_LIMIT = 4096


def _strip(tree: Any) -> Any:
    while isinstance(tree, lark.Tree) and tree.data in _PASS_THROUGH and len(tree.children) == 1 \
            and isinstance(tree.children[0], lark.Tree):
        tree = tree.children[0]
    return tree


def _conjuncts(tree: Any) -> list[Any]:
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and tree.data == "conditionaland" and len(tree.children) == 2:
        return _conjuncts(tree.children[0]) + _conjuncts(tree.children[1])
    return [tree]


def _field_path(tree: Any) -> str | None:
    tree = _strip(tree)
    if not isinstance(tree, lark.Tree):
        return None
    if tree.data == "ident":
        name = str(tree.children[0])
        return name if name in ("direction", "kind") else None
    if tree.data == "member_dot":
        base = _strip(tree.children[0])
        if isinstance(base, lark.Tree) and base.data == "ident":
            path = f"{base.children[0]}.{tree.children[1]}"
            return path if path in INDEXED_FIELDS else None
    return None


def _string_literal(tree: Any) -> str | None:
    tree = _strip(tree)
    if isinstance(tree, lark.Tree) and tree.data == "literal" and tree.children:
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
    if tree.data == "ident" and str(tree.children[0]) in lists:
        return frozenset(lists[str(tree.children[0])])
    if tree.data == "list_lit":
        values = []
        items = tree.children[0].children if tree.children else []
        for item in items:
            value = _string_literal(item)
            if value is None:
                return None
            values.append(value)
        return frozenset(values)
    return None


def guards_of(when_trees: Sequence[Any], lists: dict[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
    """Every (field -> allowed values) implied by a rule's `when` clauses."""
    guards: dict[str, frozenset[str]] = {}
    for when in when_trees:
        for conjunct in _conjuncts(when):
            if not (isinstance(conjunct, lark.Tree) and conjunct.data == "relation" and len(conjunct.children) == 2):
                continue
            operator, rhs = conjunct.children
            if not isinstance(operator, lark.Tree) or not operator.children:
                continue
            lhs = operator.children[0]
            values: frozenset[str] | None = None
            field = None
            if operator.data == "relation_eq":
                field, literal = _field_path(lhs), _string_literal(rhs)
                if field is None:
                    field, literal = _field_path(rhs), _string_literal(lhs)
                values = frozenset([literal]) if literal is not None else None
            elif operator.data == "relation_in":
                field, values = _field_path(lhs), _string_set(rhs, lists)
                if field is None:
                    # "literal" in sender.groups: the rule needs that group
                    group_field, literal = _field_path(rhs), _string_literal(lhs)
                    if group_field in MULTI_VALUED and literal is not None:
                        field, values = group_field, frozenset([literal])
                elif field in MULTI_VALUED:
                    field = None  # `groups in LIST` is a list-in-list test, not a guard
            if field is not None and values is not None:
                # two guards on one field: both must hold (for groups: either one is enough to index by)
                if field in guards and field not in MULTI_VALUED:
                    guards[field] = guards[field] & values
                else:
                    guards.setdefault(field, values)
    return guards


def guard_of(when_trees: Sequence[Any], lists: dict[str, tuple[str, ...]]) -> tuple[str, frozenset[str]] | None:
    """The most selective (field, allowed values) implied by a rule's `when` clauses, if any."""
    guards = guards_of(when_trees, lists)
    for field in INDEXED_FIELDS:
        if field in guards:
            return field, guards[field]
    return None


def build_selector(policy: Policy, model: PolicyModel) -> Callable[[Event, dict[str, Any]], Sequence[CompiledRule]] | None:
    """A function (event, activation) -> candidate rules in file order; None when indexing gains nothing."""
    all_guards = [guards_of(checked.when, model.lists) for checked in model.rules]
    if not any(all_guards):
        return None
    guards = []
    kinds_of = []
    for rule, rule_guards in zip(policy.rules, all_guards, strict=True):
        kinds = rule.kinds
        if "kind" in rule_guards:  # `kind == "call"` restricts like `on call`
            kinds = rule_guards["kind"] if kinds is None else kinds & rule_guards["kind"]
        kinds_of.append(kinds)
        guards.append(next(((f, rule_guards[f]) for f in INDEXED_FIELDS if f in rule_guards), None))
    by_index = attrgetter("index")
    # (party or None, key, table, multi-valued): read as activation[party][key] or activation[key]
    Lookup = tuple[str | None, str, dict[str, tuple[Any, ...]], bool]
    plans: dict[str, tuple[tuple[CompiledRule, ...], list[Lookup]]] = {}
    for kind in EVENT_KINDS:
        unguarded: list[CompiledRule] = []
        tables: dict[str, dict[str, list[CompiledRule]]] = {}
        for rule, guard, kinds in zip(policy.rules, guards, kinds_of, strict=True):
            if kinds is not None and kind not in kinds:
                continue
            if guard is None:
                unguarded.append(rule)
                continue
            field, values = guard
            table = tables.setdefault(field, {})
            for value in values:
                table.setdefault(value, []).append(rule)
        lookups: list[Lookup] = []
        for name, table in tables.items():
            party, _, key = name.rpartition(".")
            lookups.append((party or None, key, {v: tuple(rs) for v, rs in table.items()}, name in MULTI_VALUED))
        plans[kind] = (tuple(unguarded), lookups)
    cache: dict[tuple[Any, ...], Sequence[CompiledRule]] = {}

    def select(event: Event, activation: dict[str, Any]) -> Sequence[CompiledRule]:
        unguarded, lookups = plans[event.kind]
        if not lookups:
            return unguarded
        found = []
        key: list[Any] = [event.kind]
        for party, field, table, multi in lookups:
            value = activation[party][field] if party is not None else activation[field]
            if multi:
                hits = tuple(v for v in value if v in table)
                for v in hits:
                    found.append(table[v])
                key.append(hits)
                continue
            rules = table.get(value)
            if rules:
                found.append(rules)
                key.append(value)
            else:
                key.append(None)
        if not found:
            return unguarded
        cache_key = tuple(key)
        cached = cache.get(cache_key)
        if cached is not None:
            return cached
        merged: list[CompiledRule] = list(unguarded)
        for rules in found:
            merged.extend(rules)
        merged.sort(key=by_index)
        # one guard per rule, but a group-guarded rule may be reached through two groups
        result = tuple(dict.fromkeys(merged)) if len(found) > 1 else tuple(merged)
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[cache_key] = result
        return result

    return select
