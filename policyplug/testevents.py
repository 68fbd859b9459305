"""The events of a policy's `test` blocks: their event JSON, and why one is not a valid event.

The loader checks every test's event when the policy loads (so `check` finds a broken test);
policyplug.tester builds the same events to run the tests. Nothing here decides: this module
imports no engine, so the loader does not depend on the runtime.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from . import nodes
from .cel.check import parse_expression
from .cel.errors import CelEvaluationError
from .cel.reference import interpret
from .diagnostics import DiagnosticSink, Location, did_you_mean
from .events import CLIENT_FIELDS, EVENT_FIELDS, Event, EventError


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
    where = {
        "from": spec.sender_location,
        "to": spec.recipient_location,
        "body": spec.body_location,
        "time": spec.at_location,
    }
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
                return (
                    with_location or spec.location,
                    f"'with' sets '{unknown[0]}', which is not an event field"
                    f"{did_you_mean(unknown[0].removeprefix('client.'), CLIENT_FIELDS if '.' in unknown[0] else EVENT_FIELDS)}"
                    f" (fields: {', '.join(EVENT_FIELDS)}; client: {', '.join(CLIENT_FIELDS)})",
                )
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
