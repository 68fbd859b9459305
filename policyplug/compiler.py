"""Checked policy model -> compiled Policy: conditions become Python callables, rules get indexed.

Each CEL condition is compiled to plain Python by policyplug.cel.compile (cel-python's
interpreter stays the reference, and the fallback for what the compiler does not cover).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cel.compile import compile_expression
from .index import build_selector
from .limits import Limiter, MemoryLimiter
from .loader import PolicyModel, load_model
from .runtime import CompiledCondition, CompiledLimit, CompiledRule, Policy


def _condition(tree: Any, text: str, expected: bool, constants: dict[str, Any]) -> CompiledCondition:
    compiled = compile_expression(tree, constants)
    return CompiledCondition(compiled.evaluate, expected, text, compiled.fallback, compiled.fallback_reason)


def compile_policy(model: PolicyModel, *, limiter: Limiter | None = None, use_index: bool = True) -> Policy:
    constants = {name: entries for name, entries in model.lists.items()}
    rules: list[CompiledRule] = []
    for index, checked in enumerate(model.rules):
        node = checked.node
        conditions = [
            _condition(tree, expr.text, True, constants) for tree, expr in zip(checked.when, node.when, strict=True)
        ] + [
            _condition(tree, expr.text, False, constants) for tree, expr in zip(checked.unless, node.unless, strict=True)
        ]
        limit = None
        if node.limit is not None and checked.limit_key is not None:
            key = compile_expression(checked.limit_key, constants)
            limit = CompiledLimit(key.evaluate, node.limit.count, node.limit.seconds, node.limit.key.text)
        effect = node.effect
        obligations = node.obligations
        rule = CompiledRule(
            name=node.name, index=index, kinds=frozenset(node.kinds) if node.kinds is not None else None,
            conditions=tuple(conditions), limit=limit,
            effect=effect.kind if effect else None,
            reason=effect.argument if effect and effect.kind == "deny" else None,
            redirect_to=effect.argument if effect and effect.kind == "redirect" else None,
            route_via=next((o.argument for o in obligations if o.kind == "route via"), None),
            copy_to=tuple(o.argument for o in obligations if o.kind == "copy to"),
            disclaimers=tuple(o.argument for o in obligations if o.kind == "disclaimer"),
            tags=tuple(o.argument for o in obligations if o.kind == "tag"),
            audit=any(o.kind == "audit" for o in obligations),
            location=node.location,
        )
        rule.has_obligations = bool(rule.copy_to or rule.disclaimers or rule.tags or rule.audit)
        rules.append(rule)
    policy = Policy(
        name=model.name, revision=model.revision, path=model.path, files=model.files, reads=model.reads,
        rules=rules, default_effect=model.default.effect,
        default_reason=model.default.reason if model.default.effect == "deny" else None,
        on_error_deny=model.on_error_deny, local_domains=model.local_domains, directory=model.directory,
        lists=model.lists, tests=model.tests, limiter=limiter if limiter is not None else MemoryLimiter(),
        model=model,
    )
    if use_index:
        policy._selector = build_selector(policy, model)
    return policy


def load_policy(path: str | Path | None = None, *, text: str | None = None, base_dir: str | Path | None = None,
                limiter: Limiter | None = None) -> Policy:
    """Load, check and compile a policy (a file path, or `text=` with `base_dir=` for relative paths).

    Raises PolicyError carrying every diagnostic when the policy is invalid."""
    model = load_model(path, text=text, base_dir=base_dir)
    return compile_policy(model, limiter=limiter)
