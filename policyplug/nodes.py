"""The syntax tree of a policy file. Every node knows where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .diagnostics import Location
from .schema import EVENT_KINDS as EVENT_KINDS  # the kinds an `on` clause may name

TERMINAL_EFFECTS = ("allow", "deny", "drop", "redirect")


@dataclass(slots=True)
class Node:
    location: Location


@dataclass(slots=True)
class Expression(Node):
    """A CEL expression as written; `tree` is cel-python's parse tree once parsed."""

    text: str
    tree: Any = None


@dataclass(slots=True)
class PolicyName(Node):
    name: str


@dataclass(slots=True)
class LocalDomains(Node):
    domains: list[str]


@dataclass(slots=True)
class ListDecl(Node):
    name: str
    items: list[str] | None = None  # inline entries
    path: str | None = None  # `file "PATH"`, relative to the declaring file
    name_location: Location | None = None


@dataclass(slots=True)
class DirectoryDecl(Node):
    path: str


@dataclass(slots=True)
class Define(Node):
    name: str
    expression: Expression
    name_location: Location | None = None


@dataclass(slots=True)
class Include(Node):
    path: str


@dataclass(slots=True)
class Default(Node):
    effect: str  # allow | deny | drop
    reason: str | None = None


@dataclass(slots=True)
class OnErrorDeny(Node):
    pass


@dataclass(slots=True)
class Limit(Node):
    count: int
    window: str  # second | minute | hour | day
    key: Expression

    @property
    def seconds(self) -> float:
        return {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}[self.window]


@dataclass(slots=True)
class Effect(Node):
    """A terminal effect: allow, deny [reason], drop, redirect to ADDRESS."""

    kind: str
    argument: str | None = None


@dataclass(slots=True)
class Obligation(Node):
    """A non-terminal clause: route via, copy to, disclaimer, audit, tag."""

    kind: str
    argument: str | None = None


@dataclass(slots=True)
class Rule(Node):
    name: str
    kinds: list[str] | None = None
    kinds_location: Location | None = None
    when: list[Expression] = field(default_factory=list)
    unless: list[Expression] = field(default_factory=list)
    limit: Limit | None = None
    effects: list[Effect] = field(default_factory=list)
    obligations: list[Obligation] = field(default_factory=list)
    clause_order: list[Node] = field(default_factory=list)  # as written, for `fmt`

    @property
    def effect(self) -> Effect | None:
        return self.effects[0] if self.effects else None


@dataclass(slots=True)
class TestEvent(Node):
    kind: str
    sender: str
    recipient: str
    body: str | None = None
    at: str | None = None
    with_map: Expression | None = None
    # where each field's string is, for diagnostics about the event (checked when the policy loads)
    sender_location: Location | None = None
    recipient_location: Location | None = None
    body_location: Location | None = None
    at_location: Location | None = None


@dataclass(slots=True)
class Expectation(Node):
    decision: str
    redirect_to: str | None = None
    by: str | None = None  # rule name or "default"
    by_location: Location | None = None
    reason: str | None = None
    copy_to: list[str] = field(default_factory=list)
    route_via: str | None = None
    tags: list[str] = field(default_factory=list)
    disclaimers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Test(Node):
    name: str
    event: TestEvent | None = None
    repeat: int = 1
    expect: Expectation | None = None


@dataclass(slots=True)
class Comment(Node):
    """Comments are kept in the tree so that `fmt` can write them back."""

    text: str


@dataclass(slots=True)
class PolicyFile(Node):
    """One parsed file (a policy or an included file), statements in source order."""

    path: str
    statements: list[Node] = field(default_factory=list)
    text: str = ""
