"""Compiled rules: what policyplug.compiler makes of a checked rule, and what the rule index
(policyplug.index) and the engine (policyplug.runtime) work on. Types only, no behaviour, so that
neither of those two has to import the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Condition = Callable[[dict[str, Any]], Any]


@dataclass(slots=True)
class CompiledCondition:
    evaluate: Condition
    expected: bool  # True for `when`, False for `unless`
    text: str
    fallback: bool = False
    fallback_reason: str | None = None


@dataclass(slots=True)
class CompiledLimit:
    key: Condition
    count: int
    seconds: float
    text: str
    # `by sender`, `by recipient.domain`...: the key read straight off a party (party, field), so
    # decide() counts without building the activation; None for any other key expression
    party_key: tuple[str, str] | None = None


@dataclass(slots=True, eq=False)
class CompiledRule:
    name: str
    index: int  # position in the file: first-match order
    kinds: frozenset[str] | None
    conditions: tuple[CompiledCondition, ...]
    limit: CompiledLimit | None
    effect: str | None  # allow | deny | drop | redirect, or None for a non-terminal rule
    reason: str | None = None
    redirect_to: str | None = None
    route_via: str | None = None
    copy_to: tuple[str, ...] = ()
    disclaimers: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    audit: bool = False
    has_obligations: bool = False
    location: Any = None
    # All conditions fused into one function (event, sender, recipient, direction) -> True/False,
    # None for "look closer" (policyplug.cel.compile.compile_rules); None when not compiled.
    match: Callable[..., Any] | None = None
    python_source: str | None = None
    obligations_alone: Any = None  # Obligations of this rule alone (set by the Policy)
    outcome: tuple[Any, ...] = ()  # (effect, name, reason, redirect_to, route_via) (set by the Policy)
