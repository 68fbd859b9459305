"""Guessed witnesses: a few plain events built from a rule's own literals, for the engine to decide.

Most rules of a real policy are live, and showing it only takes one event the engine decides by
the rule. Asking the solver costs some 20 ms per question (its string theory); deciding an event
costs microseconds. So before any question, `analyze` tries events made of what the rule itself
names: the kinds of its `on` and guards, the addresses and domains it compares parties with
(its guards, docs/semantics.md step 6), local or foreign domains as its `direction` asks, its
string literals as body/type/subject, a sample of each pattern it `matches`, its integer
literals (and their neighbours) as size, and a few times of day. Nothing here is a claim: an event
counts only when the engine, deciding it, decides it by the rule (policyplug.analysis.witness);
when none does, the solver is asked as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from typing import Any

import lark
import z3

from ..cel.fastparse import rule_name
from ..nodes import EVENT_KINDS
from .guards import Guards
from .symbolic import pystr

MAX_CANDIDATES = 24
TIMES = ("2027-01-01T00:00:00Z", "2027-01-04T12:00:00Z")  # a Friday at midnight, a Monday at noon


def _tokens(tree: Any) -> Iterator[lark.Token]:
    if isinstance(tree, lark.Tree):
        for child in tree.children:
            yield from _tokens(child)
    elif isinstance(tree, lark.Token):
        yield tree


def _string(token: lark.Token) -> str | None:
    text = str(token)
    if (
        token.type == "STRING_LIT"
        and len(text) >= 2
        and text[0] == text[-1]
        and text[0] in "\"'"
        and "\\" not in text
        and not text.startswith(("'''", '"""'))
    ):
        return text[1:-1]
    return None


def _patterns(tree: Any) -> Iterator[str]:
    """The constant patterns of `x.matches("...")` in `tree`."""
    if not isinstance(tree, lark.Tree):
        return
    if (
        rule_name(tree.data) == "member_dot_arg"
        and len(tree.children) > 2
        and str(tree.children[1]) == "matches"
    ):
        for token in _tokens(tree.children[2]):
            text = _string(token) if isinstance(token, lark.Token) else None
            if text is not None:
                yield text
    for child in tree.children:
        yield from _patterns(child)


def _sample(pattern: str) -> str | None:
    """A printable text in the pattern's language (z3 on the regular expression alone: no event)."""
    from .regex import regex_core

    try:
        text = z3.String("sample")
        solver = z3.Solver()
        solver.set("timeout", 200)
        solver.add(z3.InRe(text, regex_core(pattern)), z3.InRe(text, z3.Star(z3.Range(" ", "~"))))
        if solver.check() == z3.sat:
            return pystr(solver.model().eval(text, model_completion=True))
    except Exception:  # noqa: BLE001 - a guess only: a pattern the parser does not take gives none
        return None
    return None


def candidates(
    compiled: Any,
    checked: Any,
    guards: Guards,
    local_domains: frozenset[str],
    directory: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Up to MAX_CANDIDATES event JSONs worth deciding for this rule."""
    trees = [*checked.when, *checked.unless]
    strings: list[str] = []
    ints: list[int] = []
    for tree in trees:
        for token in _tokens(tree):
            text = _string(token)
            if text is not None:
                strings.append(text)
            elif token.type == "INT_LIT":
                try:
                    ints.append(int(str(token), 0))
                except ValueError:
                    pass
    strings = list(dict.fromkeys(strings))
    samples = [
        s for p in dict.fromkeys(p for t in trees for p in _patterns(t)) if (s := _sample(p)) is not None
    ]
    kinds = sorted(guards.get("kind") or compiled.kinds or ["message"], key=EVENT_KINDS.index)
    local = sorted(local_domains)
    directions = guards.get("direction")

    def party(name: str) -> list[str]:
        addresses = sorted(guards.get(f"{name}.address", ()))
        domains = sorted(guards.get(f"{name}.domain", ()))
        # directory entries named by a literal group or attribute value come first
        named = [k for k, v in directory.items() if set(map(str, v.get("groups", ()))) & set(strings)]
        out = addresses[:2] + [f"{name[0]}@{d}" for d in domains[:2]] + named[:2]
        if not out:
            out = (
                [f"{name[0]}@{d}" for d in local[:1]] + [f"{name[0]}@{name}.example"] + sorted(directory)[:1]
            )
        return list(dict.fromkeys(out))

    def is_local(address: str) -> bool:
        return address.rpartition("@")[2] in local_domains

    pairs = []
    for sender, recipient in product(party("sender"), party("recipient")):
        direction = (
            ("internal" if is_local(recipient) else "outbound")
            if is_local(sender)
            else ("inbound" if is_local(recipient) else "transit")
        )
        if directions is None or direction in directions:
            pairs.append((sender, recipient))
    guarded = {v for values in guards.values() for v in values}
    texts = [s for s in strings if s not in guarded]
    bodies = list(dict.fromkeys(["", *samples, *texts[:3], " ".join([*samples, *texts])]))
    sizes = list(dict.fromkeys([0, *(n + d for n in ints if n >= 0 for d in (1, -1) if n + d >= 0)]))
    types = list(dict.fromkeys(["", *texts[:2]]))
    dims: list[list[Any]] = [kinds[:2], pairs[:6], bodies[:5], sizes[:5], list(TIMES), types[:3]]
    # the plainest events first: each further one changes as few fields as it can
    picks = sorted(product(*(range(len(d)) for d in dims)), key=sum)[:MAX_CANDIDATES]
    for pick in picks:
        kind, (sender, recipient), body, size, time, type_ = (d[i] for d, i in zip(dims, pick, strict=True))
        yield {
            "kind": kind,
            "from": sender,
            "to": recipient,
            "body": body,
            "size": size,
            "time": time,
            "type": type_,
            "protocol": "xmpp",
        }
