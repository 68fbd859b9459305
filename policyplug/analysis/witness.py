"""From a solver model to an event the engine decides: every witness is checked this way."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import z3

from ..addresses import AddressError, event_address
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


def _party_raw(
    protocol: str, values: tuple[str, str, str, str], nice_user: str, nice_domain: str, repair: bool
) -> tuple[str | None, tuple[str, str, str, str], bool]:
    """(raw address, the normalised fields it gives, repaired?): the model's values when an
    address spells them exactly, else (with `repair`) plain values in place of those that cannot."""
    address, user, domain, resource = values
    tries = [(user, domain, resource, False)]
    if repair:
        tries += [
            (user, domain, "", True),
            (user, nice_domain, "", True),
            (nice_user, domain, "", True),
            (nice_user, nice_domain, "", True),
        ]
    for u, d, r, repaired in tries:
        raw = _raw_address(protocol, u, d, r)
        if raw is None:
            continue
        try:
            parsed = event_address(raw, protocol)
        except AddressError:
            continue
        got = (parsed.address, parsed.user, parsed.domain, parsed.resource)
        if got == (f"{u}@{d}" if u else d, u, d, r):
            return raw, got, repaired or got != values
    return None, values, False


def event_json(model: z3.ModelRef, ev: SymEvent, repair: bool = False) -> Any:
    """The event JSON the model describes, or None when no event normalises to exactly it. With
    `repair`: (event JSON or None, repaired?), where party values no address can spell are
    replaced by plain ones (the engine's decision then says whether the event still serves)."""
    protocol = PROTOCOLS[_i(model, ev.protocol)]
    raws = []
    repaired = False
    for p in PARTIES:
        party = ev.parties[p]
        values = (
            _s(model, party.address),
            _s(model, party.user),
            _s(model, party.domain),
            _s(model, party.resource),
        )
        raw, _got, fixed = _party_raw(protocol, values, p[0], f"{p}.example", repair)
        if raw is None:
            return (None, False) if repair else None
        repaired = repaired or fixed
        raws.append(raw)
    micros = _i(model, ev.time)
    when = EPOCH + datetime.timedelta(microseconds=micros)
    data: dict[str, Any] = {
        "kind": EVENT_KINDS[_i(model, ev.kind)],
        "from": raws[0],
        "to": raws[1],
        "protocol": protocol,
        "body": _s(model, ev.body),
        "subject": _s(model, ev.subject),
        "type": _s(model, ev.type),
        "size": _i(model, ev.size),
        "time": f"{when.year:04d}-{when:%m-%dT%H:%M:%S.%f}Z",
        "client": {
            "ip": _s(model, ev.client_ip),
            "port": _i(model, ev.client_port),
            "secure": _b(model, ev.client_secure),
        },
        "headers": {k: _s(model, value) for k, (present, value) in ev.headers.items() if _b(model, present)},
        "payload": [item for item, present in ev.payload.items() if _b(model, present)],
    }
    try:
        event = Event.from_json(data)
    except (EventError, ValueError):
        return (None, False) if repair else None
    if event.time != when:
        return (None, False) if repair else None
    return (data, repaired) if repair else data


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
        raise AnalysisBug(
            f"the engine decides {data} as {decision.to_json()} but explains it as {explained.to_json()}"
        )
    matched = [step.rule for step in explained.trace or [] if step.matched]
    return Decided(decision, matched)


def _key(decision: Decision) -> tuple[Any, ...]:
    return (
        decision.decision,
        decision.rule,
        decision.reason,
        decision.redirect_to,
        decision.route_via,
        frozenset(decision.copy_to),
        frozenset(decision.disclaimers),
        frozenset(decision.tags),
        decision.audit,
    )


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


def without_rule(policy: Policy, index: int) -> Policy:
    """The policy with rule `index` removed (unindexed, its own caches and limit state): the
    engine's own answer to "what would this event get without that rule?"."""
    from dataclasses import replace
    from itertools import count

    from ..runtime import Obligations

    return replace(
        policy,
        rules=[r for r in policy.rules if r.index != index],
        limiter=MemoryLimiter(),
        _candidates={},
        _index=None,
        _parties={},
        _signatures={},
        _selection={},
        _numbers=count(),
        _no_obligations=Obligations(),
    )


def outcome_only(decision: Decision) -> tuple[Any, ...]:
    """What removing a rule must not change for it to be redundant: all but the deciding rule."""
    return _key(decision)[:1] + _key(decision)[2:]
