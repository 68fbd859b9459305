#!/usr/bin/env python3
"""Decision cost of the engine against first-match baselines, for policies of 20, 200 and 2,000 rules.

Prints, in one run, microseconds per decision (median and p99) for
  (a) policyplug: compiled Python conditions + rule index,
  (b) the same rules decided first-match with cel-python's interpreter,
  (c) the same rules decided first-match with the Rust-backed CEL runtime
      (`common-expression-language` on PyPI),
plus policy load (parse + check + compile) time, and checks that all three decide alike.

    python3 bench/bench_engine.py [--sizes 20,200,2000] [--events 2000] [--seconds 3]

Baselines (b) and (c) get the same head start as the engine: conditions parsed/compiled once,
the event's activation built once per decision, `on KIND` filtered in Python. Events are built
beforehand for all three; every timed decision starts from a fresh event (nothing the policy
derived from an earlier decision of the same Event object is kept: `_activation_cache` holds all
of it and is cleared), as an adapter that builds an Event per request would see. What an adapter
pays in all, Event.from_json included, is printed below the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policyplug import Event, load_policy  # noqa: E402
from policyplug.runtime import Policy  # noqa: E402

KINDS = ("message", "presence", "subscribe", "call", "file")


def make_policy(n_rules: int, seed: int = 7) -> str:
    """A realistic large policy: per-partner and per-user rules, some global ones.

    Conditions stick to CEL that all three runtimes support (the Rust runtime has no
    getHours(timezone)), so the comparison is like for like."""
    rng = random.Random(seed)
    blocked = ", ".join(f'"spam{i}.example"' for i in range(50))
    out = [
        f'policy "bench-{n_rules}"',
        'local domains ["acme.example", "eu.acme.example"]',
        f"list blocked = [{blocked}]",
        'default deny "not permitted"',
        "",
        "rule audit_external:",
        '  when direction != "internal"',
        "  audit",
        '  tag "external"',
        "",
        "rule blocked_domains:",
        "  when sender.domain in blocked || recipient.domain in blocked",
        '  deny "domain is blocked"',
    ]
    for i in range(n_rules - 3):
        pattern = i % 10
        name = f"r{i}"
        partner = f"p{i}.example"
        if pattern in (0, 5):
            out += [
                f"rule {name}:",
                "  on message",
                f'  when direction == "outbound" && recipient.domain == "{partner}" && size < 100000',
                "  allow",
                '  copy to "archive@acme.example"',
            ]
        elif pattern == 1:
            out += [
                f"rule {name}:",
                f'  when direction == "inbound" && sender.domain == "{partner}"',
                '  unless "quarantine" in recipient.groups',
                "  allow",
            ]
        elif pattern == 2:
            out += [
                f"rule {name}:",
                "  on message, presence",
                f'  when sender.address == "user{i}@acme.example" && body.contains("confidential")',
                '  deny "no confidential material"',
            ]
        elif pattern == 3:
            out += [
                f"rule {name}:",
                "  on call",
                f'  when recipient.domain == "{partner}" && time.getHours() >= 6',
                "  allow",
                '  route via "sip:sbc.acme.example"',
            ]
        elif pattern == 4:
            out += [
                f"rule {name}:",
                "  on message",
                f'  when direction == "outbound" && recipient.domain == "{partner}" && body.matches("[0-9]{{16}}")',
                '  deny "card number"',
            ]
        elif pattern == 6:
            out += [
                f"rule {name}:",
                "  on file",
                f"  when size > {rng.randint(1, 50)}000000 && sender.local",
                '  deny "file too large"',
            ]
        elif pattern == 7:
            out += [
                f"rule {name}:",
                f'  when recipient.address == "user{i}@acme.example" && kind == "subscribe"',
                '  redirect to "assistant@acme.example"',
            ]
        elif pattern == 8:
            out += [
                f"rule {name}:",
                f'  when "team{i}" in sender.groups && recipient.domain.endsWith(".example")',
                f'  tag "team{i}"',
            ]
        else:
            out += [
                f"rule {name}:",
                "  on presence, subscribe",
                f'  when sender.domain == "{partner}" && type != "error"',
                "  allow",
            ]
        out.append("")
    out += ["rule internal:", '  when direction == "internal"', "  allow"]
    return "\n".join(out) + "\n"


def make_events(n_rules: int, count: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for _ in range(count):
        kind = rng.choice(KINDS)
        i = rng.randrange(max(1, n_rules))
        local = f"user{rng.randrange(max(1, n_rules))}@acme.example"
        foreign = (
            f"x{rng.randrange(9)}@p{i}.example"
            if rng.random() < 0.8
            else f"bot@spam{rng.randrange(60)}.example"
        )
        sender, recipient = (local, foreign) if rng.random() < 0.6 else (foreign, local)
        if rng.random() < 0.1:
            recipient = f"user{rng.randrange(50)}@eu.acme.example"
        body = rng.choice(["hi", "see the confidential plan", "card 4111111111111111", "lunch at noon?", ""])
        events.append(
            {
                "kind": kind,
                "from": sender,
                "to": recipient,
                "body": body,
                "time": datetime(2026, 11, 24, rng.randrange(24), tzinfo=UTC).isoformat(),
                "type": "chat",
                "size": rng.randrange(200, 200_000),
            }
        )
    return events


# -- baselines: naive first-match over a CEL runtime ------------------------------------------------


class NaiveFirstMatch:
    """First-match over every rule of the policy, conditions run by a CEL runtime."""

    def __init__(self, policy: Policy, runtime: str):
        self.policy = policy
        self.runtime = runtime
        self.rules = []
        model = policy.model
        for checked, compiled in zip(model.rules, policy.rules, strict=True):
            node = checked.node
            texts = [(e.text, True) for e in node.when] + [(e.text, False) for e in node.unless]
            self.rules.append((compiled, [(self._compile(text), want) for text, want in texts]))

    def _compile(self, text: str) -> Any:
        if self.runtime == "cel-python":
            import celpy

            env = celpy.Environment()
            return env.program(env.compile(text))
        import cel

        return cel.compile(text)

    def _activation(self, event: Event) -> Any:
        plain = dict(self.policy.activation(event))
        plain.update({name: list(values) for name, values in self.policy.lists.items()})
        if self.runtime == "cel-python":
            import celpy
            from celpy import celtypes

            converted = {k: celpy.json_to_cel(v) for k, v in plain.items() if k != "time"}
            converted["time"] = celtypes.TimestampType(plain["time"])
            return converted
        import cel

        return cel.Context(plain)

    def decide(self, event: Event) -> str | None:
        event._activation_cache = None
        activation = self._activation(event)
        for rule, conditions in self.rules:
            if rule.kinds is not None and event.kind not in rule.kinds:
                continue
            ok = True
            for program, want in conditions:
                try:
                    value = (
                        program.evaluate(activation)
                        if self.runtime == "cel-python"
                        else program.execute(activation)
                    )
                except Exception:
                    ok = False
                    break
                if bool(value) is not want or not isinstance(value, bool | int):
                    ok = False
                    break
            if ok and rule.effect is not None:
                return rule.name
        return None


def measure(decide: Any, events: list[Event], seconds: float, max_count: int) -> tuple[list[float], int]:
    """Per-decision times in µs, cycling through events until time or count runs out."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter_ns
    n = 0
    while n < max_count and (n < 5 or time.perf_counter() < deadline):
        event = events[n % len(events)]
        event._activation_cache = None  # every real event is new: no cached activation
        start = clock()
        decide(event)
        times.append((clock() - start) / 1000)
        n += 1
    return times, n


def measure_from_json(
    policy: Policy, raw: list[dict[str, Any]], seconds: float, max_count: int
) -> tuple[list[float], int]:
    """Per-decision times in µs of Event.from_json(request) + policy.decide(event)."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter_ns
    decide, from_json = policy.decide, Event.from_json
    n = 0
    while n < max_count and (n < 5 or time.perf_counter() < deadline):
        data = raw[n % len(raw)]
        start = clock()
        decide(from_json(data))
        times.append((clock() - start) / 1000)
        n += 1
    return times, n


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="20,200,2000")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per baseline measurement")
    parser.add_argument("--engine-decisions", type=int, default=200_000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        import cel  # noqa: F401

        have_rust = True
    except ImportError:
        have_rust = False
        print("note: common-expression-language is not installed; column (c) is skipped")

    rows = []
    for size in sizes:
        text = make_policy(size)
        started = time.perf_counter()
        policy = load_policy(text=text)
        load_s = time.perf_counter() - started
        events = [Event.from_json(e) for e in make_events(size, args.events)]
        # warm up (regex caches, zoneinfo, index cache)
        for event in events:
            event._activation_cache = None
            policy.decide(event)
        policy.reset_limits()
        engine_times, _ = measure(policy.decide, events, 30.0, args.engine_decisions)
        interp = NaiveFirstMatch(policy, "cel-python")
        interp_times, interp_n = measure(interp.decide, events, args.seconds, 10_000)
        rust_times: list[float] = []
        if have_rust:
            rust = NaiveFirstMatch(policy, "rust")
            rust_times, _ = measure(rust.decide, events, args.seconds, 200_000)
        # agreement: the deciding rule must be the same for every runtime
        sample = events[: min(len(events), interp_n, 300)]
        disagree = 0
        for event in sample:
            event._activation_cache = None
            ours = policy.decide(event).rule
            if interp.decide(event) != ours or (have_rust and rust.decide(event) != ours):
                disagree += 1
        # what an adapter pays per request: the Event from the request's JSON, then the decision
        raw = make_events(size, args.events)
        with_event_times, _ = measure_from_json(policy, raw, 20.0, min(args.engine_decisions, 100_000))
        rows.append(
            (size, load_s, engine_times, interp_times, rust_times, len(sample), disagree, with_event_times)
        )

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def p99(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.99) - 1] if len(values) >= 100 else float("nan")

    print()
    print("µs per decision (median / p99); speed-up = baseline median / engine median")
    header = (
        f"{'rules':>6} | {'load s':>7} | {'(a) engine':>16} | {'(b) cel-python':>18} | {'x(b)':>7} | "
        f"{'(c) Rust CEL':>16} | {'x(c)':>6} | {'agree':>9}"
    )
    print(header)
    print("-" * len(header))
    for size, load_s, a, b, c, sampled, disagree, _ in rows:
        print(
            f"{size:>6} | {load_s:>7.3f} | {med(a):>7.2f} / {p99(a):>6.2f} | {med(b):>8.1f} / {p99(b):>7.1f} | "
            f"{med(b) / med(a):>7.0f} | {med(c):>7.1f} / {p99(c):>6.1f} | {med(c) / med(a):>6.0f} | "
            f"{sampled - disagree:>4}/{sampled:<4}"
        )
    print(
        "\n(a) with Event.from_json of the request included (µs, median / p99): "
        + ", ".join(f"{r[0]} rules {med(r[7]):.2f} / {p99(r[7]):.2f}" for r in rows)
    )
    by_size = {r[0]: med(r[2]) for r in rows}
    if 200 in by_size and 2000 in by_size:
        print(f"\n2,000 rules cost {by_size[2000] / by_size[200]:.2f}x what 200 rules cost per decision")
    ok = all(r[6] == 0 for r in rows)
    print(
        "all runtimes agree on every sampled decision" if ok else "DISAGREEMENT between runtimes (see above)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
