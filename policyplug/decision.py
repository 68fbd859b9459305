"""The decision: what happens to one event, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Decision:
    decision: str
    rule: str | None
    reason: str | None = None
    redirect_to: str | None = None
    route_via: str | None = None
    copy_to: list[str] = field(default_factory=list)
    disclaimers: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    audit: bool = False
    errors: list[dict[str, str]] = field(default_factory=list)
    policy: str = ""
    policy_revision: str = ""
    trace: list[TraceStep] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return self.decision == "allow" or self.decision == "redirect"

    def to_json(self) -> dict[str, Any]:
        """The decision JSON of the spec (cli.md), key for key."""
        return {
            "decision": self.decision, "rule": self.rule, "reason": self.reason,
            "redirect_to": self.redirect_to, "route_via": self.route_via,
            "copy_to": list(self.copy_to), "disclaimers": list(self.disclaimers), "tags": list(self.tags),
            "audit": self.audit, "errors": [dict(e) for e in self.errors],
            "policy": self.policy, "policy_revision": self.policy_revision,
        }

    def explain(self) -> str:
        """A human-readable trace (for `eval --explain` and failing tests)."""
        lines = []
        for step in self.trace:
            mark = "MATCH" if step.matched else "skip "
            lines.append(f"  {mark} {step.rule}: {step.why}")
        decided_by = self.rule if self.rule is not None else "default"
        lines.append(f"  => {self.decision} by {decided_by}" + (f" ({self.reason})" if self.reason else ""))
        return "\n".join(lines)
