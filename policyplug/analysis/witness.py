"""From a solver model to an event the engine decides: every witness is checked this way."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import z3

from ..decision import Decision
from ..events import Event, EventError
from ..limits import MemoryLimiter
from ..nodes import EVENT_KINDS
from ..runtime import Policy
from .symbolic import EPOCH, PARTIES, PROTOCOLS, SymEvent, pystr


class AnalysisBug(AssertionError):
    """The engine decided a witness otherwise than the exact encoding said it would."""


def _s(model: z3.ModelRef, term: Any) -> str:
    return pystr(model.eval(term, model_completion=True))


def _i(model: z3.ModelRef, term: Any) -> int:
    return model.eval(term, model_completion=True).as_long()


def _b(model: z3.ModelRef, term: Any) -> bool:
    return z3.is_true(model.eval(term, model_completion=True))


def _raw_address(protocol: str, user: str, domain: str, resource: str) -> str | None:
    if protocol == "sip":
        if resource:
            return None
        return "sip:" + (quote(user, safe="") + "@" if user else "") + domain
    if "@" in user or "/" in user or "/" in domain:
        return None
    return (f"{user}@" if user else "") + domain + (f"/{resource}" if resource else "")


def event_json(model: z3.ModelRef, ev: SymEvent) -> dict[str, Any] | None:
    """The event JSON the model describes, or None when no event normalises to exactly it."""
    protocol = PROTOCOLS[_i(model, ev.protocol)]
    parts = {}
    for p in PARTIES:
        party = ev.parties[p]
        parts[p] = (_s(model, party.address), _s(model, party.user), _s(model, party.domain), _s(model, party.resource))
    raws = [_raw_address(protocol, user, domain, resource) for _a, user, domain, resource in parts.values()]
    if None in raws:
        return None
    micros = _i(model, ev.time)
    when = EPOCH + datetime.timedelta(microseconds=micros)
    data: dict[str, Any] = {
        "kind": EVENT_KINDS[_i(model, ev.kind)], "from": raws[0], "to": raws[1], "protocol": protocol,
        "body": _s(model, ev.body), "subject": _s(model, ev.subject), "type": _s(model, ev.type),
        "size": _i(model, ev.size), "time": f"{when.year:04d}-{when:%m-%dT%H:%M:%S.%f}Z",
        "client": {"ip": _s(model, ev.client_ip), "port": _i(model, ev.client_port),
                   "secure": _b(model, ev.client_secure)},
        "headers": {k: _s(model, value) for k, (present, value) in ev.headers.items() if _b(model, present)},
        "payload": [item for item, present in ev.payload.items() if _b(model, present)],
    }
    try:
        event = Event.from_json(data)
    except (EventError, ValueError):
        return None
    for p, address in (("sender", event.sender), ("recipient", event.recipient)):
        if (address.address, address.user, address.domain, address.resource) != parts[p]:
            return None
    if event.time != when:
        return None
    return data


@dataclass
class Decided:
    decision: Decision
    matched: list[str]  # rules whose obligations or effect applied, in order


def decide(policy: Policy, data: dict[str, Any], repeat: int = 1) -> Decided:
    """Decide `data` with a fresh limit state (`repeat` times, the last one counts), and the rules
    it matched (the explained walk, fresh state again)."""
    limiter = MemoryLimiter()
    decision = None
    for _ in range(repeat):
        decision = policy.decide(Event.from_json(data), limiter=limiter)
    limiter = MemoryLimiter()
    explained = None
    for _ in range(repeat):
        explained = policy.decide(Event.from_json(data), explain=True, limiter=limiter)
    assert decision is not None and explained is not None
    if _key(decision) != _key(explained):
        raise AnalysisBug(f"the engine decides {data} as {decision.to_json()} but explains it as "
                          f"{explained.to_json()}")
    matched = [step.rule for step in explained.trace or [] if step.matched]
    return Decided(decision, matched)


def _key(decision: Decision) -> tuple[Any, ...]:
    return (decision.decision, decision.rule, decision.reason, decision.redirect_to, decision.route_via,
            frozenset(decision.copy_to), frozenset(decision.disclaimers), frozenset(decision.tags), decision.audit)


def outcome_key(decision: Decision) -> tuple[Any, ...]:
    """What diff compares: effect, deciding rule, reason, redirect, route and obligations (as sets)."""
    return _key(decision)


def public_event(data: dict[str, Any]) -> dict[str, Any]:
    """The witness as printed: fields at their defaults left out."""
    out = dict(data)
    for key, empty in (("body", ""), ("subject", ""), ("type", ""), ("headers", {}), ("payload", [])):
        if out.get(key) == empty:
            del out[key]
    if out.get("client") == {"ip": "", "port": 0, "secure": False}:
        del out["client"]
    body = data.get("body", "")
    if out.get("size") == len(body.encode("utf-8", "surrogatepass")):
        del out["size"]
    return out
