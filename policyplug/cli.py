"""The `policyplug` command line (docs/cli.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compiler import load_policy
from .diagnostics import PolicyError
from .events import Event, EventError
from .tester import policy_files, run_tests, uncovered_rules

# Sub-packages that add their own commands (each: add_commands(subparsers)).
COMMAND_MODULES = (
    "policyplug.demo",
    "policyplug.service.commands",
    "policyplug.audit.commands",
    "policyplug.usage.commands",
    "policyplug.starter",
    "policyplug.analysis.commands",
    "policyplug.directory_ldap",
)  # directory export: docs/scaling.md


def _print_diagnostics(error: PolicyError) -> None:
    for diagnostic in error.diagnostics:
        print(diagnostic.format(), file=sys.stderr)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def cmd_check(args: argparse.Namespace) -> int:
    files = policy_files(args.paths)
    if not files:
        print("policyplug check: no *.policy files found in " + " ".join(args.paths), file=sys.stderr)
        return 1
    failed = 0
    errors = 0
    warnings = 0
    for path in files:
        try:
            policy = load_policy(path, allowed_paths=args.allow_path)
        except PolicyError as exc:
            _print_diagnostics(exc)
            failed += 1
            errors += len(exc.diagnostics)
            continue
        for warning in policy.warnings:  # the policy loads; what it may not mean is said all the same
            print(warning.format(), file=sys.stderr)
        warnings += len(policy.warnings)
        warnings += _print_lint(policy, args)
        if args.explain_compile:
            fallbacks = policy.fallbacks()
            compiled = sum(len(r.conditions) for r in policy.rules) - len(fallbacks)
            print(f"{path}: {compiled} conditions compiled to Python, {len(fallbacks)} run by cel-python")
            for rule, text, why in fallbacks:
                print(f"  rule {rule}: {text}  ({why})")
        elif not args.quiet:
            noted = f", {_plural(len(policy.warnings), 'warning')}" if policy.warnings else ""
            print(
                f"{path}: ok (policy '{policy.name}', {len(policy.rules)} rules, {len(policy.tests)} tests{noted})"
            )
        if getattr(args, "strict", False):  # analysis findings fail the check (docs/analysis.md)
            from .analysis.analyze import analyze

            claims = analyze(policy, witnesses=False).claims
            for finding in claims:
                by = f" by {', '.join(finding.by or [])}" if finding.kind == "shadowed" else ""
                print(
                    f"{finding.file or path}:{finding.line}: error: rule {finding.rule} is {finding.kind}{by}",
                    file=sys.stderr,
                )
            if claims:
                failed += 1
                errors += len(claims)
    if len(files) > 1 or failed:
        noted = f", {_plural(warnings, 'warning')}" if warnings else ""
        print(
            f"{len(files) - failed} valid, {failed} invalid ({errors} errors{noted})",
            file=sys.stderr if failed else sys.stdout,
        )
    return 1 if failed else 0


def _print_lint(policy, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from .lint import lint_policy  # operator pitfalls: lockouts, components outside local domains

    found = lint_policy(policy, getattr(args, "prosody_config", None))
    for warning in found:
        print(warning.format(), file=sys.stderr)
    return len(found)


def cmd_test(args: argparse.Namespace) -> int:
    files = policy_files(args.paths)
    if not files:
        print("policyplug test: no *.policy files found in " + " ".join(args.paths), file=sys.stderr)
        return 1
    passed = failed = uncovered = 0
    invalid = False
    started = time.perf_counter()
    for path in files:
        try:
            policy = load_policy(path, allowed_paths=args.allow_path)
        except PolicyError as exc:
            _print_diagnostics(exc)
            invalid = True
            continue
        outcomes = run_tests(policy)
        if args.coverage:
            missing = uncovered_rules(policy, outcomes)
            covered = len(policy.rules) - len(missing)
            print(
                f"{path}: {covered}/{len(policy.rules)} rules matched in some test"
                + (f"; never: {', '.join(missing)}" if missing else "")
            )
            uncovered += len(missing)
        for outcome in outcomes:
            if outcome.passed:
                passed += 1
                if args.verbose:
                    print(f"PASS {outcome.location} {outcome.name}")
            else:
                failed += 1
                print(
                    "FAIL "
                    + (outcome.describe(with_trace=args.verbose) if args.verbose else _one_line(outcome))
                )
    elapsed = time.perf_counter() - started
    if args.verbose:
        print(f"# {len(files)} policy files in {elapsed:.2f}s", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or invalid or (args.coverage and args.require_coverage and uncovered) else 0


def _one_line(outcome) -> str:  # type: ignore[no-untyped-def]
    from .tester import describe_decision, describe_expectation

    expect = outcome.test.expect
    expected = describe_expectation(expect) if expect else "?"
    if outcome.decision is None:  # the test could not run: say why, not just "decided nothing"
        return (
            f"{outcome.location} {outcome.name}: expected {expected}; not run: {'; '.join(outcome.problems)}"
        )
    decided = describe_decision(outcome.decision)
    trace = ""
    if outcome.decision is not None and outcome.decision.trace:
        trace = " | trace: " + ", ".join(
            f"{s.rule}={'match' if s.matched else 'no'}" for s in outcome.decision.trace
        )
    return f"{outcome.location} {outcome.name}: expected {expected}; decided {decided}{trace}"


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy, allowed_paths=args.allow_path)
    except PolicyError as exc:
        _print_diagnostics(exc)
        return 1
    try:
        if args.event in (None, "-"):
            raw = sys.stdin.read()
        else:
            raw = Path(args.event).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"policyplug eval: cannot read event: {exc}", file=sys.stderr)
        return 2
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        print(f"invalid event: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", file=sys.stderr)
        return 2
    try:
        event = Event.from_json(data)
    except EventError as exc:
        print(f"invalid event: {exc}", file=sys.stderr)
        return 2
    decision = policy.decide(event, explain=args.explain)
    print(json.dumps(decision.to_json(), ensure_ascii=False))
    if args.explain:
        print(
            f"{event.kind} from {event.sender.address} to {event.recipient.address} "
            f"({policy.activation(event)['direction']}):",
            file=sys.stderr,
        )
        print(decision.explain(), file=sys.stderr)
        for error in decision.errors:
            print(f"  error in {error['rule']}: {error['message']}", file=sys.stderr)
    return 0


def cmd_fmt(args: argparse.Namespace) -> int:
    from .formatter import format_file

    files = policy_files(args.paths)
    changed = 0
    invalid = 0
    for path in files:
        try:
            original = path.read_text(encoding="utf-8")
            formatted = format_file(original, str(path))
        except PolicyError as exc:
            _print_diagnostics(exc)
            invalid += 1
            continue
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            invalid += 1
            continue
        if formatted != original:
            changed += 1
            if args.check:
                print(f"would reformat {path}")
            else:
                path.write_text(formatted, encoding="utf-8")
                print(f"reformatted {path}")
    if args.check:
        return 1 if changed or invalid else 0
    return 1 if invalid else 0


def add_allow_path(p: argparse.ArgumentParser) -> None:
    """--allow-path DIR: a folder outside the policy's own that its includes, lists and directory may
    lie in (docs/language.md, "Files a policy reads")."""
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="let includes, list files and the directory lie in DIR too (repeatable; "
        "default: only the policy's own folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyplug", description="A policy engine for XMPP and SIP servers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="load policies and print every diagnostic")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--explain-compile",
        action="store_true",
        help="list conditions that run on cel-python's interpreter instead of compiled Python",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only diagnostics")
    p.add_argument(
        "--prosody-config",
        type=Path,
        metavar="FILE",
        help="warn about the hosts and components of this prosody.cfg.lua that are not local domains",
    )
    add_allow_path(p)
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail on analyze findings: shadowed, unsatisfiable or redundant rules",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("test", help="run the test blocks of policies")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="show passing tests and full traces")
    p.add_argument("--coverage", action="store_true", help="list rules that matched in no test")
    p.add_argument(
        "--require-coverage",
        action="store_true",
        help="with --coverage: exit 1 when a rule matched in no test",
    )
    add_allow_path(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("eval", help="decide one event given as JSON")
    p.add_argument("policy", metavar="POLICY")
    p.add_argument("--event", metavar="FILE", help="event JSON file ('-' or absent: standard input)")
    p.add_argument("--explain", action="store_true", help="print a trace of every rule on standard error")
    add_allow_path(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fmt", help="rewrite policies in canonical layout")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--check", action="store_true", help="only report files that would change")
    p.set_defaults(func=cmd_fmt)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


class _ClosedPipeSafe:
    """A text stream that outlives the reader going away (`policyplug test x.policy | head -1`).

    On the first BrokenPipeError the stream's descriptor is pointed at /dev/null (what Python's
    documentation recommends, so the final flush at exit fails no more) and the command runs on to
    its end, so it exits with the status it would have had: a failing suite piped into `head`
    must still fail a `set -o pipefail` gate (it exited 0)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ClosedPipeSafe(sys.stdout), _ClosedPipeSafe(sys.stderr)  # type: ignore[assignment]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # a write that bypassed the text streams (their binary buffer): the command did not finish,
        # so its status is unknown; fail rather than let a pipeline pass on a result nobody saw
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, streams[0].fileno())
        os.close(devnull)
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):
                pass
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
