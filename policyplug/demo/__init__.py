"""`policyplug demo`: a walkthrough on the bundled example policy (the ACME policy of docs/language.md).

It loads the policy, runs its own tests, then decides real example events (event JSON files
shipped beside it) and explains each decision. Everything is embedded in the package, so
the command works on a fresh install with no arguments.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..compiler import load_policy
from ..events import Event
from ..tester import run_tests

DEMO_DIR = Path(__file__).parent
POLICY = DEMO_DIR / "acme" / "acme.policy"
EVENTS = DEMO_DIR / "events"


def run_demo(args: argparse.Namespace) -> int:
    policy_path = Path(args.policy) if args.policy else POLICY
    events_dir = Path(args.events) if args.events else EVENTS
    started = time.perf_counter()
    policy = load_policy(policy_path)
    loaded = time.perf_counter() - started
    print(f"policy '{policy.name}' from {policy_path}")
    print(
        f"  {len(policy.rules)} rules, revision {policy.revision[:19]}…, loaded and compiled in {loaded * 1000:.1f} ms"
    )
    outcomes = run_tests(policy)
    passed = sum(o.passed for o in outcomes)
    print(f"  its own tests: {passed} passed, {len(outcomes) - passed} failed\n")
    files = sorted(events_dir.glob("*.json"))
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        event = Event.from_json(data)
        decision = policy.decide(event, explain=args.explain)
        direction = policy.activation(event)["direction"]
        print(f"{path.name}: {event.kind} {event.sender.raw} -> {event.recipient.raw} ({direction})")
        print(f"  normalised: {event.sender.address} -> {event.recipient.address}")
        line = f"  => {decision.decision.upper()} by {decision.rule or 'default'}"
        if decision.reason:
            line += f": {decision.reason}"
        print(line)
        for label, values in (
            ("copy to", decision.copy_to),
            ("disclaimer", decision.disclaimers),
            ("tags", decision.tags),
        ):
            if values:
                print(f"     {label}: {', '.join(values)}")
        if decision.route_via:
            print(f"     route via: {decision.route_via}")
        if decision.audit:
            print("     audited")
        if args.explain:
            print(decision.explain())
        print()
    # A small throughput figure, so the walkthrough also shows what a decision costs.
    events = [Event.from_json(json.loads(p.read_text(encoding="utf-8"))) for p in files]
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        for event in events:
            event._activation_cache = None  # each real event is new: nothing cached
            policy.decide(event)
    elapsed = time.perf_counter() - started
    count = rounds * len(events)
    print(f"{count} decisions in {elapsed:.3f} s: {elapsed / count * 1e6:.2f} µs per decision")
    return 0 if passed == len(outcomes) else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="walk through the bundled example policy and events")
    p.add_argument("--policy", help="another policy to walk through")
    p.add_argument("--events", help="a folder of event JSON files")
    p.add_argument("--explain", action="store_true", help="show the trace of every decision")
    p.set_defaults(func=run_demo)
