"""`policyplug report`: usage reports from the usage store, or from audit logs."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..compiler import load_policy
from ..diagnostics import PolicyError
from .audit_source import count_audit_logs
from .backends import is_postgres_url
from .report import Table, build_tables, render_csv, render_html, render_text
from .store import UsageStore


def _stderr(line: str) -> None:
    print(f"policyplug report: {line}", file=sys.stderr, flush=True)


def _from_audit_logs(args: argparse.Namespace) -> tuple[list[Table], list[str]]:
    """The tables and the heading lines that say what they were counted from."""
    policy = load_policy(args.policy)
    with tempfile.TemporaryDirectory(prefix="policyplug-report-") as folder:
        db = Path(folder) / "usage.db"
        # a store on disk, not in memory: a year of logs makes many rows; flushed only when
        # 5,000 rows are pending (and on close), since nothing reads it before the end
        store = UsageStore(db, flush_interval=math.inf)
        try:
            reading = count_audit_logs(args.audit_log, policy, store, _stderr)
        finally:
            store.close()
        if store.errors:  # the store logs a lost batch and goes on (for serve); a report would be wrong
            raise OSError(f"counting failed ({store.errors} batches lost): {store.last_error}")
        return build_tables(db, args.since, args.until, args.top), reading.heading()


def cmd_report(args: argparse.Namespace) -> int:
    # argparse's mutually exclusive group has made sure exactly one of --db and --audit-log is given;
    # a usage error about --policy ends the same way (usage line, exit 2)
    if args.audit_log and args.policy is None:
        args.usage_error("--audit-log needs --policy (its local domains give each event's direction)")
    if args.db and args.policy is not None:
        args.usage_error("--policy is only for --audit-log")
    try:
        if args.audit_log:
            tables, source = _from_audit_logs(args)
        else:
            read: Callable[..., Any] = build_tables
            if is_postgres_url(args.db):
                from .postgres_store import build_tables as read  # the same tables from PostgreSQL
            tables, source = read(args.db, args.since, args.until, args.top), []
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 1
    except OSError as exc:
        _stderr(str(exc))
        return 1
    period = f"from {args.since or 'the beginning'} until {args.until or 'now'}"
    if args.html:
        Path(args.html).write_text(render_html(tables, period="; ".join([period, *source])), encoding="utf-8")
        print(f"wrote {args.html}")
    if args.format == "csv":
        for line in source:  # CSV has no heading to hold them, and must stay one CSV
            _stderr(line)
        sys.stdout.write(render_csv(tables))
    elif not args.html or args.format == "text":
        print("\n".join([f"policyplug usage report, {period}", *source]) + "\n")
        sys.stdout.write(render_text(tables))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="usage reports from the usage store (SQLite or PostgreSQL) or from audit logs"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--db",
        help="the usage store written by `policyplug serve --usage-db`: a SQLite "
        "file or postgresql://... (password: PGPASSWORD or ~/.pgpass)",
    )
    source.add_argument(
        "--audit-log",
        nargs="+",
        metavar="LOG",
        help="audit logs, any order: files, a base name with its rotations, or a folder "
        "(only audited decisions are counted)",
    )
    p.add_argument(
        "--policy", help="with --audit-log: the policy whose local domains give each event's direction"
    )
    p.add_argument("--since", help="start of the period (RFC 3339 or YYYY-MM-DD), inclusive")
    p.add_argument("--until", help="end of the period, exclusive")
    p.add_argument("--format", choices=("text", "csv"), default=None)
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    p.add_argument("--top", type=int, default=10, help="rows in the top-N tables")
    p.set_defaults(func=cmd_report, usage_error=p.error)
