"""Cheap guards: which rules can never meet, read off their first `when` (as the rule index does,
docs/semantics.md step 6), so that a question about one rule leaves out the rules it cannot meet.

A guard is a top-level conjunct of a rule's first `when` that compares `kind`, `direction`, or a
party's `domain`/`address` with constants (`==`, `in` a list or list literal); with the rule's
`on`. Such a comparison never raises, so where it is false, `&&` makes the whole first condition
false without an error, and later conditions are not evaluated: the rule neither matches nor
raises. Two rules whose guards allow disjoint values in some dimension never both reach their
conditions' other parts for one event.
"""

from __future__ import annotations

from typing import Any

import lark

from ..cel.fastparse import rule_name
from .symbolic import unwrap

Guards = dict[str, frozenset[str]]
_DIMENSIONS = {
    "kind",
    "direction",
    "sender.domain",
    "sender.address",
    "recipient.domain",
    "recipient.address",
}


def _conjuncts(tree: Any) -> list[Any]:
    node = unwrap(tree)
    if isinstance(node, lark.Tree) and rule_name(node.data) == "conditionaland" and len(node.children) == 2:
        return _conjuncts(node.children[0]) + _conjuncts(node.children[1])
    return [node]


def _dimension(tree: Any) -> str | None:
    node = unwrap(tree)
    if not isinstance(node, lark.Tree):
        return None
    if rule_name(node.data) == "ident" and str(node.children[0]) in ("kind", "direction"):
        return str(node.children[0])
    if rule_name(node.data) == "member_dot":
        target = unwrap(node.children[0])
        if isinstance(target, lark.Tree) and rule_name(target.data) == "ident":
            name = f"{target.children[0]}.{node.children[1]}"
            return name if name in _DIMENSIONS else None
    return None


def _strings(tree: Any, lists: dict[str, tuple[str, ...]]) -> frozenset[str] | None:
    node = unwrap(tree)
    if not isinstance(node, lark.Tree):
        return None
    name = rule_name(node.data)
    if name == "literal" and len(node.children) == 1:
        token = node.children[0]
        text = str(token)
        if (
            isinstance(token, lark.Token)
            and token.type == "STRING_LIT"
            and len(text) >= 2
            and text[0] == text[-1]
            and text[0] in "\"'"
            and "\\" not in text
            and not text.startswith(("'''", '"""'))
        ):
            return frozenset({text[1:-1]})
        return None
    if name == "ident" and str(node.children[0]) in lists:
        return frozenset(lists[str(node.children[0])])
    if name == "list_lit":
        items: set[str] = set()
        for child in node.children[0].children if node.children else []:
            values = _strings(child, lists)
            if values is None or len(values) != 1:
                return None
            items |= values
        return frozenset(items)
    return None


def guards(kinds: frozenset[str] | None, when: list[Any], lists: dict[str, tuple[str, ...]]) -> Guards:
    out: Guards = {}
    if kinds is not None:
        out["kind"] = frozenset(kinds)
    if not when:
        return out
    for conjunct in _conjuncts(when[0]):
        if not (isinstance(conjunct, lark.Tree) and rule_name(conjunct.data) == "relation"):
            continue
        op_node, right = conjunct.children
        op = rule_name(op_node.data)
        left = op_node.children[0]
        if op == "relation_eq":
            for a, b in ((left, right), (right, left)):
                dim, values = _dimension(a), _strings(b, lists)
                if dim is not None and values is not None:
                    out[dim] = out[dim] & values if dim in out else values
                    break
        elif op == "relation_in":
            dim, values = _dimension(left), _strings(right, lists)
            if dim is not None and values is not None:
                out[dim] = out[dim] & values if dim in out else values
    return out


def disjoint(a: Guards, b: Guards) -> bool:
    return any(dim in b and not (values & b[dim]) for dim, values in a.items())
