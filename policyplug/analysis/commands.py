"""The `analyze`, `diff` and `replay` commands (docs/cli.md, docs/analysis.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..compiler import load_policy
from ..diagnostics import PolicyError


def _load(path: str) -> Any:
    try:
        return load_policy(path)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return None
    except OSError as exc:
        print(f"policyplug: cannot read {path}: {exc}", file=sys.stderr)
        return None


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    policy = _load(args.policy)
    if policy is None:
        return 2
    result = analyze(policy)
    if args.format == "json":
        _print_json(result.to_json())
    else:
        for f in result.findings:
            extra = f" by {', '.join(f.by or [])}" if f.kind == "shadowed" else ""
            why = f": {f.reason}" if f.reason else ""
            print(f"{f.file or args.policy}:{f.line}: rule {f.rule}: {f.kind}{extra}{why}")
            if f.witness is not None:
                print(f"    witness: {json.dumps(f.witness, ensure_ascii=False)}")
        print(f"{len(result.claims)} findings, {len(result.findings) - len(result.claims)} unknown")
    return 1 if result.claims else 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff

    old, new = _load(args.old), _load(args.new)
    if old is None or new is None:
        return 2
    result = diff(old, new)
    if args.format == "json":
        _print_json(result.to_json())
    else:
        for change in result.changes:
            o, n = change["old"], change["new"]
            print(
                f"{o['rule'] or 'default'} ({o['decision']}) -> {n['rule'] or 'default'} ({n['decision']}): "
                f"{json.dumps(change['witness'], ensure_ascii=False)}"
            )
        for unknown in result.unknown:
            print(f"unknown: {unknown}")
        print(
            "same decisions for every event"
            if result.same
            else f"{len(result.changes)} changes, {len(result.unknown)} unknown"
        )
    return 0 if result.same else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    policy = _load(args.policy)
    if policy is None:
        return 2
    try:
        result = replay(
            policy,
            args.logs,
            lambda line: print(f"policyplug replay: {line}", file=sys.stderr, flush=True),
            jobs=args.jobs,
        )
    except OSError as exc:
        print(f"policyplug replay: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        _print_json(result.to_json())
    else:
        print(
            f"{result.events} events replayed, {result.changed} decided differently"
            + (f", {result.skipped} lines skipped" if result.skipped else "")
        )
        for name, count in result.hits.items():
            print(f"  {name}: {count}")
        if result.never_hit:
            print(f"never hit: {', '.join(result.never_hit)}")
        for sample in result.samples:
            print(
                f"  {sample['old'].get('rule') or 'default'} ({sample['old'].get('decision')}) -> "
                f"{sample['new']['rule'] or 'default'} ({sample['new']['decision']}): "
                f"{json.dumps(sample['event'], ensure_ascii=False)}"
            )
        if result.without_bodies:
            print(
                f"{result.without_bodies} records carry no body (audit bodies off): decided with an empty body"
                + (
                    f"; rules reading body or subject: {', '.join(result.body_rules)}"
                    if result.body_rules
                    else ""
                )
            )
    return 1 if result.changed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("analyze", help="rules that can never decide or change anything (SMT)")
    p.add_argument("policy", metavar="POLICY")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("diff", help="the events two policies decide differently (SMT)")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("replay", help="decide the events of audit logs again under a policy")
    p.add_argument("policy", metavar="POLICY")
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes replaying a large log when the policy has no limit (default: the CPUs usable)",
    )
    p.set_defaults(func=cmd_replay)
