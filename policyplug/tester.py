"""Rule tests: run the `test` blocks of a policy and compare decisions with `expect`.

Used by `policyplug test` and by the pytest plugin. Every test starts from fresh `limit`
state, so tests pass in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import nodes
from .addresses import AddressError, parse_address, sip_uri_suffix
from .decision import Decision
from .events import Event, EventError, parse_time
from .limits import MemoryLimiter
from .runtime import Policy
from .testevents import build_event_json, repeat_problem


@dataclass
class TestOutcome:
    test: nodes.Test
    passed: bool
    problems: list[str] = field(default_factory=list)
    decision: Decision | None = None

    @property
    def name(self) -> str:
        return self.test.name

    @property
    def location(self) -> str:
        loc = self.test.location
        return f"{loc.file}:{loc.line}"

    def describe(self, with_trace: bool = True) -> str:
        """Expected vs decided, the deciding rule and (optionally) the trace."""
        expect = self.test.expect
        lines = [f"{self.location}: test '{self.name}' failed: " + "; ".join(self.problems)]
        if expect is not None:
            lines.append(f"  expected: {describe_expectation(expect)}")
        if self.decision is not None:
            lines.append(f"  decided:  {describe_decision(self.decision)}")
            if with_trace and self.decision.trace:
                lines.append("  trace:")
                lines.append(self.decision.explain())
            if self.decision.errors:
                lines.append(
                    "  errors: " + "; ".join(f"{e['rule']}: {e['message']}" for e in self.decision.errors)
                )
        return "\n".join(lines)


def describe_expectation(expect: nodes.Expectation) -> str:
    parts = [expect.decision]
    if expect.redirect_to:
        parts.append(f'to "{expect.redirect_to}"')
    if expect.by:
        parts.append(f"by {expect.by}")
    if expect.reason is not None:
        parts.append(f'reason "{expect.reason}"')
    parts += [f'copy to "{a}"' for a in expect.copy_to]
    if expect.route_via:
        parts.append(f'route via "{expect.route_via}"')
    parts += [f'tag "{t}"' for t in expect.tags]
    parts += [f'disclaimer "{d}"' for d in expect.disclaimers]
    return " ".join(parts)


def describe_decision(decision: Decision) -> str:
    parts = [decision.decision]
    if decision.redirect_to:
        parts.append(f'to "{decision.redirect_to}"')
    parts.append(f"by {decision.rule or 'default'}")
    if decision.reason is not None:
        parts.append(f'reason "{decision.reason}"')
    parts += [f'copy to "{a}"' for a in decision.copy_to]
    if decision.route_via:
        parts.append(f'route via "{decision.route_via}"')
    parts += [f'tag "{t}"' for t in decision.tags]
    parts += [f'disclaimer "{d}"' for d in decision.disclaimers]
    return " ".join(parts)


def run_test(policy: Policy, test: nodes.Test) -> TestOutcome:
    if test.event is None or test.expect is None:
        return TestOutcome(test, False, ["the test has no event or no expect"])
    try:
        data = build_event_json(test.event)
        start = parse_time(data["time"]) if "time" in data else datetime.now(UTC)
        data.pop("time", None)
        event = Event.from_json(data)
    except EventError as exc:
        return TestOutcome(test, False, [f"invalid test event: {exc}"])
    problem = repeat_problem(start, test.repeat)
    if problem is not None:  # the loader reports it; a test built by hand gets it here
        return TestOutcome(test, False, [f"invalid test event: {problem}"])
    limiter = MemoryLimiter()  # fresh state: no counter carries over from another test
    decision: Decision | None = None
    for i in range(test.repeat):
        event.time = start + timedelta(milliseconds=i)
        event._activation_cache = None
        decision = policy.decide(event, limiter=limiter, explain=(i == test.repeat - 1))
    assert decision is not None
    problems = check_expectation(test.expect, decision)
    return TestOutcome(test, not problems, problems, decision)


def check_expectation(expect: nodes.Expectation, decision: Decision) -> list[str]:
    problems = []
    if decision.decision != expect.decision:
        problems.append(f"expected {expect.decision}, decided {decision.decision}")
    if expect.redirect_to is not None and not same_address(decision.redirect_to, expect.redirect_to):
        problems.append(f'expected redirect to "{expect.redirect_to}", got {decision.redirect_to!r}')
    if expect.by is not None:
        decided_by = decision.rule or "default"
        if decided_by != expect.by:
            problems.append(f"expected by {expect.by}, decided by {decided_by}")
    if expect.reason is not None and decision.reason != expect.reason:
        problems.append(f'expected reason "{expect.reason}", got {decision.reason!r}')
    for address in expect.copy_to:
        if not any(same_address(copy, address) for copy in decision.copy_to):
            problems.append(f'expected copy to "{address}", copies: {decision.copy_to}')
    if expect.route_via is not None and decision.route_via != expect.route_via:
        problems.append(f'expected route via "{expect.route_via}", got {decision.route_via!r}')
    for tag in expect.tags:
        if tag not in decision.tags:
            problems.append(f'expected tag "{tag}", tags: {decision.tags}')
    for text in expect.disclaimers:
        if text not in decision.disclaimers:
            problems.append(f'expected disclaimer "{text}", disclaimers: {decision.disclaimers}')
    return problems


def same_address(decided: str | None, expected: str) -> bool:
    """`expect redirect to` / `copy to`: the same address however it is spelt (the engine's
    normalisation: `Archive@ACME.example` is `archive@acme.example`), as written otherwise."""
    if decided is None:
        return False
    if decided == expected:
        return True
    try:
        a, b = parse_address(decided), parse_address(expected)
    except AddressError:
        return False
    # a SIP redirect or copy also goes by its port, parameters and headers (`:5061;transport=tls`)
    return (a.protocol, a.scheme, a.address, a.resource) == (
        b.protocol,
        b.scheme,
        b.address,
        b.resource,
    ) and (a.protocol != "sip" or sip_uri_suffix(a.raw) == sip_uri_suffix(b.raw))


def run_tests(policy: Policy) -> list[TestOutcome]:
    return [run_test(policy, test) for test in policy.tests]


def uncovered_rules(policy: Policy, outcomes: list[TestOutcome]) -> list[str]:
    """Rules that matched in no test (neither decided nor added obligations)."""
    matched = {step.rule for o in outcomes if o.decision for step in o.decision.trace if step.matched}
    return [rule.name for rule in policy.rules if rule.name not in matched]


def policy_files(paths: list[str]) -> list[Path]:
    """Each path as given: a file, or every *.policy below a folder (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.policy") if p.is_file()))
        else:
            found.append(path)
    return found
