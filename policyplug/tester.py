"""Rule tests: run the `test` blocks of a policy and compare decisions with `expect`.

Used by `policyplug test` and by the pytest plugin. Every test starts from fresh `limit`
state, so tests pass in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import nodes
from .addresses import AddressError, parse_address, sip_uri_suffix
from .cel.check import parse_expression
from .cel.errors import CelEvaluationError
from .cel.reference import interpret
from .decision import Decision
from .diagnostics import DiagnosticSink, Location, did_you_mean
from .events import CLIENT_FIELDS, EVENT_FIELDS, Event, EventError, parse_time
from .limits import MemoryLimiter
from .runtime import Policy


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
                lines.append("  errors: " + "; ".join(f"{e['rule']}: {e['message']}" for e in self.decision.errors))
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


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_map(expression: nodes.Expression) -> dict[str, Any]:
    sink = DiagnosticSink()
    tree = parse_expression(expression, sink)
    if tree is None:
        raise EventError("with: " + "; ".join(d.message for d in sink.diagnostics))
    try:
        value = interpret(tree, {})({})
    except CelEvaluationError as exc:
        raise EventError(f"with: {exc}") from None
    if not isinstance(value, dict):
        raise EventError("with: expected a map literal {...}")
    return {str(k): v for k, v in value.items()}


def build_event_json(spec: nodes.TestEvent, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The event JSON of a test; `extra` is its `with` map when the caller has evaluated it already."""
    data: dict[str, Any] = {"kind": spec.kind, "from": spec.sender, "to": spec.recipient}
    if spec.body is not None:
        data["body"] = spec.body
    if spec.at is not None:
        data["time"] = spec.at
    if spec.with_map is not None:
        data = _deep_merge(data, _with_map(spec.with_map) if extra is None else extra)
    return data


def repeat_problem(start: datetime, repeat: int) -> str | None:
    """Why `repeat` events 1 ms apart from `start` cannot be made (past the last time there is), or None."""
    try:
        start + timedelta(milliseconds=repeat - 1)
    except OverflowError:
        return f"'repeat {repeat}' runs past the last time there is"
    return None


def test_event_problem(spec: nodes.TestEvent, repeat: int = 1) -> tuple[Location, str] | None:
    """Why a test's event is not a valid event, and where (the field's string, or the `with` map);
    None when it is valid. The loader reports it, so a broken test is found by `check`, never
    only when it runs."""
    where = {"from": spec.sender_location, "to": spec.recipient_location, "body": spec.body_location,
             "time": spec.at_location}
    with_location = spec.with_map.location if spec.with_map is not None else None
    extra: dict[str, Any] | None = None
    try:
        if spec.with_map is not None:
            extra = _with_map(spec.with_map)
            unknown = [key for key in extra if key not in EVENT_FIELDS]
            client = extra.get("client")
            if isinstance(client, dict):
                unknown += [f"client.{key}" for key in client if key not in CLIENT_FIELDS]
            if unknown:
                return (with_location or spec.location,
                        f"'with' sets '{unknown[0]}', which is not an event field"
                        f"{did_you_mean(unknown[0].removeprefix('client.'), CLIENT_FIELDS if '.' in unknown[0] else EVENT_FIELDS)}"
                        f" (fields: {', '.join(EVENT_FIELDS)}; client: {', '.join(CLIENT_FIELDS)})")
        event = Event.from_json(build_event_json(spec, extra))
        problem = repeat_problem(event.time, repeat)
        if problem is not None:
            return where["time"] or with_location or spec.location, f"invalid event: {problem}"
    except EventError as exc:
        message = str(exc)
        location = with_location if message.startswith("with:") else None
        if location is None:
            named = message.split("'", 2)[1] if message.startswith("field '") else ""
            set_by_with = extra is not None and named.split(".")[0] in extra
            location = with_location if set_by_with else where.get(named)
        return location or spec.location, f"invalid event: {message}"
    return None


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
    return ((a.protocol, a.scheme, a.address, a.resource) == (b.protocol, b.scheme, b.address, b.resource)
            and (a.protocol != "sip" or sip_uri_suffix(a.raw) == sip_uri_suffix(b.raw)))


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
