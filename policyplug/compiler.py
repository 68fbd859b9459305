"""Checked policy model -> compiled Policy: conditions become Python callables, rules get indexed.

The conditions of every rule are compiled to plain Python by policyplug.cel.compile, all rules
of a policy in one generated module: one matcher function per rule (cel-python's interpreter stays
the reference, and the fallback for what the compiler does not cover). Each condition also gets
its own function, compiled on first use: the engine needs it only to report an evaluation error
or to explain a decision.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import nodes
from .cel.compile import compile_expression, compile_rules
from .compiled import CompiledCondition, CompiledLimit, CompiledRule
from .index import build_index
from .limits import Limiter, MemoryLimiter
from .loader import PolicyModel, load_model
from .runtime import Policy


class LazyCondition:
    """`evaluate(activation)` of one condition, compiled the first time it is called."""

    __slots__ = ("tree", "constants", "function")

    def __init__(self, tree: Any, constants: Mapping[str, Any]):
        self.tree = tree
        self.constants = constants
        self.function: Any = None

    def __call__(self, activation: Mapping[str, Any]) -> Any:
        function = self.function
        if function is None:
            function = self.function = compile_expression(self.tree, self.constants).evaluate
            self.tree = None
        return function(activation)


# a limit key that is a party or one of its string fields: decide() reads it off the party directly
_PARTY_KEY = re.compile(r"\s*(sender|recipient)\s*(?:\.\s*(address|user|domain|resource)\s*)?")


def _party_key(text: str) -> tuple[str, str] | None:
    """`sender` -> ("sender", "address") (a party counts by its address); `recipient.domain` ->
    ("recipient", "domain"); None for any other expression."""
    found = _PARTY_KEY.fullmatch(text)
    return (found.group(1), found.group(2) or "address") if found else None


def _condition(tree: Any, text: str, expected: bool, constants: dict[str, Any]) -> CompiledCondition:
    compiled = compile_expression(tree, constants)
    return CompiledCondition(compiled.evaluate, expected, text, compiled.fallback, compiled.fallback_reason)


def compile_policy(model: PolicyModel, *, limiter: Limiter | None = None, use_index: bool = True) -> Policy:
    constants = {name: entries for name, entries in model.lists.items()}
    per_rule = []
    for checked in model.rules:
        node = checked.node
        per_rule.append(
            [(tree, True, expr.text) for tree, expr in zip(checked.when, node.when, strict=True)]
            + [(tree, False, expr.text) for tree, expr in zip(checked.unless, node.unless, strict=True)]
        )
    fused = compile_rules(
        [[(tree, expected) for tree, expected, _ in conditions] for conditions in per_rule], constants
    )
    rules: list[CompiledRule] = []
    for index, (checked, conditions, code) in enumerate(zip(model.rules, per_rule, fused, strict=True)):
        node = checked.node
        if code.matcher is not None:
            compiled_conditions = tuple(
                CompiledCondition(LazyCondition(tree, constants), expected, text)
                for tree, expected, text in conditions
            )
        else:  # a condition falls back to cel-python (or the rule is too big for one function)
            compiled_conditions = tuple(
                _condition(tree, text, expected, constants) for tree, expected, text in conditions
            )
        limit = None
        if node.limit is not None and checked.limit_key is not None:
            key = compile_expression(checked.limit_key, constants)
            limit = CompiledLimit(
                key.evaluate,
                node.limit.count,
                node.limit.seconds,
                node.limit.key.text,
                _party_key(node.limit.key.text),
            )
        effect = node.effect
        obligations = node.obligations
        rule = CompiledRule(
            name=node.name,
            index=index,
            kinds=frozenset(node.kinds) if node.kinds is not None else None,
            conditions=compiled_conditions,
            limit=limit,
            effect=effect.kind if effect else None,
            reason=effect.argument if effect and effect.kind == "deny" else None,
            redirect_to=effect.argument if effect and effect.kind == "redirect" else None,
            route_via=next((o.argument for o in obligations if o.kind == "route via"), None),
            copy_to=_arguments(obligations, "copy to"),
            disclaimers=_arguments(obligations, "disclaimer"),
            tags=_arguments(obligations, "tag"),
            audit=any(o.kind == "audit" for o in obligations),
            location=node.location,
            match=code.matcher,
            python_source=code.python_source,
        )
        rule.has_obligations = bool(rule.copy_to or rule.disclaimers or rule.tags or rule.audit)
        rules.append(rule)
    policy = Policy(
        name=model.name,
        revision=model.revision,
        path=model.path,
        files=model.files,
        reads=model.reads,
        rules=rules,
        default_effect=model.default.effect,
        default_reason=model.default.reason if model.default.effect == "deny" else None,
        on_error_deny=model.on_error_deny,
        local_domains=model.local_domains,
        directory=model.directory,
        lists=model.lists,
        tests=model.tests,
        limiter=limiter if limiter is not None else MemoryLimiter(),
        model=model,
    )
    policy._index = (
        build_index(rules, [checked.when for checked in model.rules], model.lists) if use_index else None
    )
    return policy


def _arguments(obligations: Iterable[nodes.Obligation], kind: str) -> tuple[str, ...]:
    """The arguments of the obligations of one kind, in order (these kinds always have one)."""
    return tuple(o.argument for o in obligations if o.kind == kind and o.argument is not None)


def load_policy(
    path: str | Path | None = None,
    *,
    text: str | None = None,
    base_dir: str | Path | None = None,
    limiter: Limiter | None = None,
    allowed_paths: Iterable[str | Path] = (),
) -> Policy:
    """Load, check and compile a policy (a file path, or `text=` with `base_dir=` for relative paths).

    Its includes, list files and directory must lie in its folder or in `allowed_paths` (docs/language.md).
    Raises PolicyError carrying every diagnostic when the policy is invalid."""
    with _collector_paused():
        model = load_model(path, text=text, base_dir=base_dir, allowed_paths=allowed_paths)
        return compile_policy(model, limiter=limiter)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while a policy loads.

    A load allocates a few hundred thousand objects that all stay alive (parse trees, mostly), and
    the collector's full passes, triggered by that growth, would walk the whole growing heap five
    or six times meanwhile: measured, a third of the load time of a 2,000-rule policy. Nothing a
    load builds relies on cycle collection, so the collector resumes afterwards (if it was
    running) and deals with the new objects in its own time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
