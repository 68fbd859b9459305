"""The decision: what happens to one event, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DECISIONS = ("allow", "deny", "drop", "redirect")


@dataclass(slots=True)
class TraceStep:
    """One rule visited during a decision: whether it matched, and if not, why not."""

    rule: str
    matched: bool
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "matched": self.matched, "why": self.why}


class Decision:
    """One decision. Attributes as in the decision JSON (docs/cli.md); `copy_to`, `disclaimers`, `tags`,
    `errors` and `trace` are lists (created on first read when empty)."""

    __slots__ = (
        "decision",
        "rule",
        "reason",
        "redirect_to",
        "route_via",
        "_copy_to",
        "_disclaimers",
        "_tags",
        "audit",
        "_errors",
        "policy",
        "policy_revision",
        "_trace",
    )
    # None or a tuple shared between decisions until first read (see below), then a list
    _copy_to: list[str] | tuple[str, ...] | None
    _disclaimers: list[str] | tuple[str, ...] | None
    _tags: list[str] | tuple[str, ...] | None

    def __init__(
        self,
        decision: str,
        rule: str | None,
        reason: str | None = None,
        redirect_to: str | None = None,
        route_via: str | None = None,
        copy_to: list[str] | None = None,
        disclaimers: list[str] | None = None,
        tags: list[str] | None = None,
        audit: bool = False,
        errors: list[dict[str, str]] | None = None,
        policy: str = "",
        policy_revision: str = "",
        trace: list[TraceStep] | None = None,
    ):
        self.decision = decision
        self.rule = rule
        self.reason = reason
        self.redirect_to = redirect_to
        self.route_via = route_via
        self._copy_to = copy_to
        self._disclaimers = disclaimers
        self._tags = tags
        self.audit = audit
        self._errors = errors
        self.policy = policy
        self.policy_revision = policy_revision
        self._trace = trace

    # The list attributes are created on first read (the engine stores None for an empty one, or
    # a tuple it shares between decisions): most decisions have no copies, tags, errors or trace,
    # and deciding should not pay for five lists nobody looks at.
    @property
    def copy_to(self) -> list[str]:
        value = self._copy_to
        if value.__class__ is not list:
            value = self._copy_to = [] if value is None else list(value)
        return value

    @copy_to.setter
    def copy_to(self, value: list[str]) -> None:
        self._copy_to = value

    @property
    def disclaimers(self) -> list[str]:
        value = self._disclaimers
        if value.__class__ is not list:
            value = self._disclaimers = [] if value is None else list(value)
        return value

    @disclaimers.setter
    def disclaimers(self, value: list[str]) -> None:
        self._disclaimers = value

    @property
    def tags(self) -> list[str]:
        value = self._tags
        if value.__class__ is not list:
            value = self._tags = [] if value is None else list(value)
        return value

    @tags.setter
    def tags(self, value: list[str]) -> None:
        self._tags = value

    @property
    def errors(self) -> list[dict[str, str]]:
        value = self._errors
        if value.__class__ is not list:
            value = self._errors = [] if value is None else list(value)
        return value

    @errors.setter
    def errors(self, value: list[dict[str, str]]) -> None:
        self._errors = value

    @property
    def trace(self) -> list[TraceStep]:
        value = self._trace
        if value.__class__ is not list:
            value = self._trace = [] if value is None else list(value)
        return value

    @trace.setter
    def trace(self, value: list[TraceStep]) -> None:
        self._trace = value

    @property
    def allowed(self) -> bool:
        return self.decision == "allow" or self.decision == "redirect"

    def to_json(self) -> dict[str, Any]:
        """The decision JSON (docs/cli.md), key for key."""
        copy_to, disclaimers, tags, errors = self._copy_to, self._disclaimers, self._tags, self._errors
        return {
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "redirect_to": self.redirect_to,
            "route_via": self.route_via,
            "copy_to": list(copy_to) if copy_to else [],
            "disclaimers": list(disclaimers) if disclaimers else [],
            "tags": list(tags) if tags else [],
            "audit": self.audit,
            "errors": [dict(e) for e in errors] if errors else [],
            "policy": self.policy,
            "policy_revision": self.policy_revision,
        }

    def shape(self) -> tuple[Any, ...] | None:
        """Everything to_json() gives, as a hashable key (decisions of the hot path share their
        obligation tuples), or None when a member is a list (errors, or obligations set by hand)."""
        copy_to, disclaimers, tags = self._copy_to, self._disclaimers, self._tags
        if (
            self._errors
            or (copy_to.__class__ is list)
            or (disclaimers.__class__ is list)
            or (tags.__class__ is list)
        ):
            return None
        return (
            self.decision,
            self.rule,
            self.reason,
            self.redirect_to,
            self.route_via,
            copy_to or (),
            disclaimers or (),
            tags or (),
            self.audit,
            self.policy,
            self.policy_revision,
        )

    def _fields(self) -> tuple[Any, ...]:
        def as_list(value: Any) -> list[Any]:
            return list(value) if value else []

        return (
            self.decision,
            self.rule,
            self.reason,
            self.redirect_to,
            self.route_via,
            as_list(self._copy_to),
            as_list(self._disclaimers),
            as_list(self._tags),
            self.audit,
            as_list(self._errors),
            self.policy,
            self.policy_revision,
            as_list(self._trace),
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value: not hashable

    def __repr__(self) -> str:
        names = (
            "decision",
            "rule",
            "reason",
            "redirect_to",
            "route_via",
            "copy_to",
            "disclaimers",
            "tags",
            "audit",
            "errors",
            "policy",
            "policy_revision",
            "trace",
        )
        return "Decision(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=True)) + ")"

    def explain(self) -> str:
        """A human-readable trace (for `eval --explain` and failing tests)."""
        lines = []
        for step in self._trace or ():
            mark = "MATCH" if step.matched else "skip "
            lines.append(f"  {mark} {step.rule}: {step.why}")
        decided_by = self.rule if self.rule is not None else "default"
        lines.append(f"  => {self.decision} by {decided_by}" + (f" ({self.reason})" if self.reason else ""))
        return "\n".join(lines)
